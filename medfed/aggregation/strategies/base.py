"""Strategy interface and registry.

A strategy turns the current global weights and the round's site updates into
the next global weights. An update is a *delta*: the site's locally trained
weights minus the global weights it started from.

Most strategies need only the sample-weighted mean of the deltas, which is all
that secure aggregation reveals; they implement ``apply``. Rules that must see
each update (median, Krum) set ``needs_individual_updates`` and override
``aggregate``; the config schema rejects them under secure aggregation.
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
    "Weights",
    "get_strategy",
    "register_strategy",
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


class Strategy(ABC):
    """Combines site updates into the next global model.

    Subclasses take their hyperparameters as keyword arguments validated in
    ``__init__``. Server-side state (momentum, optimizer moments) is exposed
    through ``state_dict`` so the aggregation service can persist it.
    """

    name: ClassVar[str]
    needs_individual_updates: ClassVar[bool] = False

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> Weights:
        """Return the next global weights from ``updates``."""
        return self.apply(global_weights, weighted_mean(updates))

    @abstractmethod
    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        """Return the next global weights from the sample-weighted mean delta."""

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


def weighted_mean(updates: Sequence[SiteUpdate]) -> Weights:
    """Return the sample-count-weighted mean of the updates' deltas.

    Accumulates in float64 and returns float32.

    Raises:
        AggregationError: no updates, or a non-positive sample count.
    """
    if not updates:
        raise AggregationError("cannot aggregate a round with no updates")
    total = 0
    sums: dict[str, np.ndarray] = {}
    for update in updates:
        if update.sample_count <= 0:
            raise AggregationError(
                f"site {update.site!r} reported sample_count {update.sample_count}; "
                "it must be positive"
            )
        total += update.sample_count
        for key, value in update.delta.items():
            contribution = np.asarray(value, np.float64) * update.sample_count
            sums[key] = sums[key] + contribution if key in sums else contribution
    return {key: (value / total).astype(np.float32) for key, value in sums.items()}
