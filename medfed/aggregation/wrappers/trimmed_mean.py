"""Coordinate-wise trimmed mean (Yin et al., 2018).

For each coordinate, the ``floor(beta * n)`` largest and as many smallest of
the n sites' values are dropped and the rest averaged, ignoring sample counts.
Because ``beta < 0.5``, at least one value per coordinate always remains.
"""

import math

import numpy as np

from medfed.aggregation.params import require_float
from medfed.aggregation.strategies.base import Strategy
from medfed.aggregation.wrappers.base import register_wrapper
from medfed.aggregation.wrappers.robust import CoordinateWiseRule

__all__ = ["TrimmedMean"]


@register_wrapper
class TrimmedMean(CoordinateWiseRule):
    """Replaces the mean delta by the coordinate-wise trimmed mean.

    Args:
        inner: the strategy that applies the combined delta.
        beta: fraction trimmed from each end, in [0, 0.5).
    """

    name = "trimmed_mean"

    def __init__(self, inner: Strategy, *, beta: float = 0.1) -> None:
        super().__init__(inner)
        self.beta = require_float(
            "beta", beta, minimum=0.0, maximum=0.5, exclusive_maximum=True
        )

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        site_count = stacked.shape[0]
        trimmed = math.floor(self.beta * site_count)
        ordered = np.sort(stacked, axis=0)
        return ordered[trimmed : site_count - trimmed].mean(axis=0)
