"""Aggregation strategies, registered by name (see ``base.Strategy``)."""

from medfed.aggregation.strategies import fedavg
from medfed.aggregation.strategies.base import (
    STRATEGIES,
    SiteUpdate,
    Strategy,
    Weights,
    get_strategy,
    weighted_mean,
)

__all__ = [
    "STRATEGIES",
    "SiteUpdate",
    "Strategy",
    "Weights",
    "fedavg",
    "get_strategy",
    "weighted_mean",
]
