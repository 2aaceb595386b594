"""Strategy interface and registry.

A strategy turns the current global weights and the round's site updates into
the next global weights. An update is a *delta*: the site's locally trained
weights minus the global weights it started from.

Two entry points exist because of secure aggregation:

- ``aggregate(global_weights, updates)`` receives every site's update. Rules
  that must see each update (median, Krum) set ``needs_individual_updates``
  and override it; the config check rejects them under secure aggregation.
- ``aggregate_sum(global_weights, summed)`` receives only the sums of the
  updates, which is all that masking secure aggregation reveals. Strategies
  that need only the mean delta implement ``apply`` and inherit both.

Invariants: weights are ``dict[str, np.ndarray]`` of float32; arithmetic runs
in float64 and results are cast back to float32; a strategy's persistent state
(``state_dict``) is a flat mapping of name to numpy array, so the service can
store it in a safetensors file.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from medfed.errors import AggregationError, ConfigError

__all__ = [
    "STRATEGIES",
    "SiteUpdate",
    "Strategy",
    "UpdateSum",
    "Weights",
    "get_strategy",
    "register_strategy",
    "sum_updates",
    "weighted_mean",
]

Weights = dict[str, np.ndarray]

STRATEGIES: dict[str, type["Strategy"]] = {}


@dataclass(frozen=True)
class SiteUpdate:
    """One site's contribution to a round."""

    site: str
    delta: Mapping[str, np.ndarray]
    sample_count: int
    #: Additional named tensors some strategies send (SCAFFOLD's control variates).
    extras: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateSum:
    """The sums of a round's updates: what secure aggregation reveals.

    Attributes:
        delta: sum over sites of ``weight * delta``, float64.
        weight_total: sum of the sites' weights (their sample counts, or one per
            site when the strategy uses uniform weighting).
        site_count: number of updates in the sums.
        extras: per extra group, the unweighted sum over sites of each tensor.
    """

    delta: Mapping[str, np.ndarray]
    weight_total: float
    site_count: int
    extras: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)

    def mean_delta(self) -> Weights:
        """Return the weighted mean delta, ``delta / weight_total``."""
        if not self.weight_total > 0:
            raise AggregationError(
                f"cannot average updates with total weight {self.weight_total}; "
                "it must be positive"
            )
        return {key: value / self.weight_total for key, value in self.delta.items()}

    def mean_extras(self, group: str) -> Weights:
        """Return the unweighted mean over sites of the extra tensors ``group``.

        Raises:
            AggregationError: the sums lack that group.
        """
        if group not in self.extras:
            raise AggregationError(
                f"the round's updates carry no {group!r} tensors; "
                "every site must send them for this strategy"
            )
        return {
            key: value / self.site_count for key, value in self.extras[group].items()
        }


class Strategy(ABC):
    """Combines site updates into the next global model.

    Subclasses take their hyperparameters as keyword arguments validated in
    ``__init__``. Server-side state (momentum, optimizer moments) is exposed
    through ``state_dict`` so the aggregation service can persist it.
    """

    name: ClassVar[str]
    #: Whether ``aggregate`` must see each update; wrappers set it per instance
    #: from the strategy they wrap.
    needs_individual_updates: bool = False

    @property
    def uniform_weighting(self) -> bool:
        """Whether every site weighs one in the mean, whatever its sample count.

        When true, a service that receives masked updates must have sites send
        unscaled deltas and divide the unmasked sum by the number of sites.
        """
        return False

    @property
    def site_extras(self) -> tuple[str, ...]:
        """The extras groups each site must send with its delta.

        Each group contains one tensor per uploaded model tensor, of the same
        shape (SCAFFOLD's ``control_delta``).
        """
        return ()

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> Weights:
        """Return the next global weights from every site's update."""
        summed = sum_updates(updates, uniform=self.uniform_weighting)
        return self.aggregate_sum(global_weights, summed)

    def aggregate_sum(
        self, global_weights: Mapping[str, np.ndarray], summed: UpdateSum
    ) -> Weights:
        """Return the next global weights from the sums of the updates."""
        return self.apply(global_weights, summed.mean_delta())

    @abstractmethod
    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        """Return the next global weights from the sample-weighted mean delta."""

    def site_settings(self) -> dict[str, float]:
        """Return the scalars sites need for local training (clip norm, mu)."""
        return {}

    def published_tensors(self) -> dict[str, Weights]:
        """Return the tensors to publish to sites next to the global model.

        Keys name a group (``"control_variate"``), values map parameter name
        to a float32 array.
        """
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise AggregationError(f"strategy {self.name!r} keeps no state to load")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator that adds a strategy to the registry under ``cls.name``."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build the strategy registered as ``name``.

    Raises:
        ConfigError: no strategy has that name, or a parameter is invalid.
    """
    import medfed.aggregation.strategies  # noqa: F401  (registers built-ins)

    if name not in STRATEGIES:
        raise ConfigError(
            f"unknown strategy {name!r}: choose one of {', '.join(sorted(STRATEGIES))}"
        )
    try:
        return STRATEGIES[name](**dict(params or {}))
    except TypeError as error:
        raise ConfigError(
            f"invalid parameters for strategy {name!r}: {error}"
        ) from None


def _check_sample_count(update: SiteUpdate) -> None:
    if update.sample_count <= 0:
        raise AggregationError(
            f"site {update.site!r} reported sample_count {update.sample_count}; "
            "it must be positive"
        )


def _check_same_tensors(
    reference: SiteUpdate, update: SiteUpdate, what: str, tensors: Mapping
) -> None:
    expected = reference.delta if what == "delta" else reference.extras[what]
    if set(tensors) != set(expected):
        raise AggregationError(
            f"site {update.site!r} sent {what} tensors {sorted(tensors)}, "
            f"but site {reference.site!r} sent {sorted(expected)}"
        )
    for key, value in tensors.items():
        if np.shape(value) != np.shape(expected[key]):
            raise AggregationError(
                f"site {update.site!r} sent {what} tensor {key!r} of shape "
                f"{list(np.shape(value))}, expected {list(np.shape(expected[key]))}"
            )


def sum_updates(updates: Sequence[SiteUpdate], *, uniform: bool = False) -> UpdateSum:
    """Sum the updates the way secure aggregation would, in float64.

    Args:
        updates: the round's updates; all must carry the same tensors and the
            same extra groups.
        uniform: weigh every site one instead of its sample count.

    Raises:
        AggregationError: no updates, a non-positive sample count, or updates
            whose tensor names, shapes or extra groups differ.
    """
    if not updates:
        raise AggregationError("cannot aggregate a round with no updates")
    reference = updates[0]
    weight_total = 0.0
    delta_sums: dict[str, np.ndarray] = {}
    extra_sums: dict[str, dict[str, np.ndarray]] = {
        group: {} for group in reference.extras
    }
    for update in updates:
        _check_sample_count(update)
        _check_same_tensors(reference, update, "delta", update.delta)
        if set(update.extras) != set(reference.extras):
            raise AggregationError(
                f"site {update.site!r} sent extra groups {sorted(update.extras)}, "
                f"but site {reference.site!r} sent {sorted(reference.extras)}"
            )
        weight = 1.0 if uniform else float(update.sample_count)
        weight_total += weight
        for key, value in update.delta.items():
            contribution = np.asarray(value, np.float64) * weight
            if key in delta_sums:
                delta_sums[key] = delta_sums[key] + contribution
            else:
                delta_sums[key] = contribution
        for group, tensors in update.extras.items():
            _check_same_tensors(reference, update, group, tensors)
            sums = extra_sums[group]
            for key, value in tensors.items():
                array = np.asarray(value, np.float64)
                sums[key] = sums[key] + array if key in sums else array
    return UpdateSum(
        delta=delta_sums,
        weight_total=weight_total,
        site_count=len(updates),
        extras=extra_sums,
    )


def weighted_mean(updates: Sequence[SiteUpdate]) -> Weights:
    """Return the sample-count-weighted mean of the updates' deltas.

    Accumulates in float64 and returns float32.

    Raises:
        AggregationError: no updates, or a non-positive sample count.
    """
    mean = sum_updates(updates).mean_delta()
    return {key: value.astype(np.float32) for key, value in mean.items()}
