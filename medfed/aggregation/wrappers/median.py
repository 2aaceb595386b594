"""Coordinate-wise median (Yin et al., 2018).

Each coordinate of the combined delta is the median of that coordinate over
the sites, ignoring sample counts, so fewer than half of the sites cannot
drag it outside the range of the honest values.
"""

import numpy as np

from medfed.aggregation.strategies.base import Strategy
from medfed.aggregation.wrappers.base import register_wrapper
from medfed.aggregation.wrappers.robust import CoordinateWiseRule

__all__ = ["CoordinateMedian"]


@register_wrapper
class CoordinateMedian(CoordinateWiseRule):
    """Replaces the mean delta by the coordinate-wise median.

    Args:
        inner: the strategy that applies the combined delta.
    """

    name = "median"

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)
