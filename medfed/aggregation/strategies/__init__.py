"""Aggregation strategies, registered by name (see ``base.Strategy``)."""

from medfed.aggregation.strategies import (
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedyogi,
    scaffold,
)
from medfed.aggregation.strategies.base import (
    STRATEGIES,
    SiteUpdate,
    Strategy,
    UpdateSum,
    Weights,
    get_strategy,
    sum_updates,
    weighted_mean,
)

__all__ = [
    "STRATEGIES",
    "SiteUpdate",
    "Strategy",
    "UpdateSum",
    "Weights",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedyogi",
    "get_strategy",
    "scaffold",
    "sum_updates",
    "weighted_mean",
]
