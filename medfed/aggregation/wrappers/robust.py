"""Shared machinery of the Byzantine-robust rules (median, trimmed mean, Krum).

A robust rule must see every site's update, so it cannot run under masking
secure aggregation, which reveals only their sum. Coordinate-wise rules apply
the same combination to each tensor of the delta and of every extras group;
the combined result goes to the inner strategy as an ``UpdateSum`` whose mean
is the robust estimate.
"""

from abc import abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

from medfed.aggregation.strategies.base import (
    SiteUpdate,
    UpdateSum,
    Weights,
    sum_updates,
)
from medfed.aggregation.wrappers.base import StrategyWrapper
from medfed.errors import AggregationError

__all__ = ["CoordinateWiseRule", "RobustRule"]


class RobustRule(StrategyWrapper):
    """Base of the rules that combine individual updates robustly."""

    needs_individual_updates = True
    combines_updates = True

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> Weights:
        # Summing checks that every update carries the same tensors, shapes
        # and positive sample counts before any rule looks at them.
        sum_updates(updates)
        return self.inner.aggregate_sum(global_weights, self.combine(updates))

    def aggregate_sum(
        self, global_weights: Mapping[str, np.ndarray], summed: UpdateSum
    ) -> Weights:
        raise AggregationError(
            f"{self.name} needs each site's update, but received only their sum; "
            "disable secure aggregation for this study or use norm_bound instead"
        )

    @abstractmethod
    def combine(self, updates: Sequence[SiteUpdate]) -> UpdateSum:
        """Return an ``UpdateSum`` whose mean delta is the robust estimate."""


class CoordinateWiseRule(RobustRule):
    """A rule that reduces each coordinate over the sites independently."""

    @abstractmethod
    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        """Reduce ``stacked`` of shape (sites, *tensor shape) over axis 0."""

    def combine(self, updates: Sequence[SiteUpdate]) -> UpdateSum:
        delta = {
            key: self.reduce(
                np.stack([np.asarray(u.delta[key], np.float64) for u in updates])
            )
            for key in updates[0].delta
        }
        # Extras are carried as sums over sites, so scale the robust mean back.
        site_count = len(updates)
        extras = {
            group: {
                key: site_count
                * self.reduce(
                    np.stack(
                        [np.asarray(u.extras[group][key], np.float64) for u in updates]
                    )
                )
                for key in tensors
            }
            for group, tensors in updates[0].extras.items()
        }
        return UpdateSum(
            delta=delta, weight_total=1.0, site_count=site_count, extras=extras
        )
