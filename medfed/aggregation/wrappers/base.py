"""Wrapper interface and registry.

A wrapper is a strategy built around another strategy (``inner``): it changes
one step of aggregation (clipping, a robust combination, central DP noise) and
forwards the rest, so every rule composes with every server optimizer instead
of being copied into each.

A study lists its wrappers in the order they see the updates; the first listed
is the outermost object. A wrapper that *combines* the updates itself (robust
rules, central DP) hands the inner strategy an ``UpdateSum`` and must be listed
last (see ``medfed.aggregation.compatibility``).

State: a wrapper's ``state_dict`` holds its own entries under ``"<name>/"``
and the inner strategy's under ``"inner/"``.
"""

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from medfed.aggregation.strategies.base import (
    SiteUpdate,
    Strategy,
    UpdateSum,
    Weights,
)
from medfed.errors import AggregationError, ConfigError

__all__ = [
    "WRAPPERS",
    "StrategyWrapper",
    "get_wrapper",
    "register_wrapper",
    "wrapped_chain",
]

WRAPPERS: dict[str, type["StrategyWrapper"]] = {}

_INNER = "inner/"


class StrategyWrapper(Strategy):
    """A strategy that delegates to ``inner`` except where it overrides.

    Args:
        inner: the strategy to wrap.
    """

    #: Whether this wrapper combines the updates itself instead of passing
    #: them on, so no other combining wrapper may sit inside it.
    combines_updates: ClassVar[bool] = False

    def __init__(self, inner: Strategy) -> None:
        if self.combines_updates:
            for wrapped in wrapped_chain(inner):
                if isinstance(wrapped, StrategyWrapper) and wrapped.combines_updates:
                    raise ConfigError(
                        f"{self.name} and {wrapped.name} each combine the updates "
                        "themselves, so only one of them can run; keep one"
                    )
        self.inner = inner
        self.needs_individual_updates = (
            type(self).needs_individual_updates or inner.needs_individual_updates
        )

    @property
    def uniform_weighting(self) -> bool:
        return self.inner.uniform_weighting

    @property
    def site_extras(self) -> tuple[str, ...]:
        return self.inner.site_extras

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> Weights:
        return self.inner.aggregate(global_weights, updates)

    def aggregate_sum(
        self, global_weights: Mapping[str, np.ndarray], summed: UpdateSum
    ) -> Weights:
        return self.inner.aggregate_sum(global_weights, summed)

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        return self.inner.apply(global_weights, mean_delta)

    def site_settings(self) -> dict[str, float]:
        return self.inner.site_settings()

    def published_tensors(self) -> dict[str, Weights]:
        return self.inner.published_tensors()

    def own_state_dict(self) -> dict[str, np.ndarray]:
        """Return this wrapper's own state, without the inner strategy's."""
        return {}

    def load_own_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``own_state_dict`` returned."""
        if state:
            raise AggregationError(f"wrapper {self.name!r} keeps no state to load")

    def state_dict(self) -> dict[str, np.ndarray]:
        own_prefix = f"{self.name}/"
        state = {
            own_prefix + key: value for key, value in self.own_state_dict().items()
        }
        state.update(
            {_INNER + key: value for key, value in self.inner.state_dict().items()}
        )
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        own_prefix = f"{self.name}/"
        own: dict[str, np.ndarray] = {}
        inner: dict[str, np.ndarray] = {}
        for key, value in state.items():
            if key.startswith(own_prefix):
                own[key.removeprefix(own_prefix)] = value
            elif key.startswith(_INNER):
                inner[key.removeprefix(_INNER)] = value
            else:
                raise AggregationError(
                    f"unexpected key {key!r} in the state for wrapper "
                    f"{self.name!r}; keys start with {own_prefix!r} or {_INNER!r}"
                )
        self.inner.load_state_dict(inner)
        self.load_own_state_dict(own)


def wrapped_chain(strategy: Strategy) -> list[Strategy]:
    """Return ``strategy`` and every strategy inside it, outermost first."""
    chain = [strategy]
    while isinstance(chain[-1], StrategyWrapper):
        chain.append(chain[-1].inner)
    return chain


def register_wrapper(cls: type[StrategyWrapper]) -> type[StrategyWrapper]:
    """Class decorator that adds a wrapper to the registry under ``cls.name``."""
    WRAPPERS[cls.name] = cls
    return cls


def get_wrapper(
    name: str, inner: Strategy, params: Mapping[str, Any] | None = None
) -> StrategyWrapper:
    """Wrap ``inner`` in the wrapper registered as ``name``.

    Raises:
        ConfigError: no wrapper has that name, or a parameter is invalid.
    """
    import medfed.aggregation.wrappers  # noqa: F401  (registers built-ins)

    if name not in WRAPPERS:
        raise ConfigError(
            f"unknown wrapper {name!r}: choose one of {', '.join(sorted(WRAPPERS))}"
        )
    try:
        return WRAPPERS[name](inner, **dict(params or {}))
    except TypeError as error:
        raise ConfigError(f"invalid parameters for wrapper {name!r}: {error}") from None
