"""Wrappers around any strategy: norm bounding, central DP, robust rules."""

from medfed.aggregation.wrappers import (
    central_dp,
    krum,
    median,
    norm_bound,
    trimmed_mean,
)
from medfed.aggregation.wrappers.base import (
    WRAPPERS,
    StrategyWrapper,
    get_wrapper,
    register_wrapper,
)
from medfed.aggregation.wrappers.clipping import clip_update, update_norm

__all__ = [
    "WRAPPERS",
    "StrategyWrapper",
    "central_dp",
    "clip_update",
    "get_wrapper",
    "krum",
    "median",
    "norm_bound",
    "register_wrapper",
    "trimmed_mean",
    "update_norm",
]
