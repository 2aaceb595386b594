"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

Each update's score is the sum of squared L2 distances to its
``n - f - 2`` nearest other updates (at least one), where ``f`` is the number
of Byzantine sites tolerated. Krum keeps the update with the lowest score;
Multi-Krum keeps the ``m`` lowest and averages them weighted by sample count.
Among equal scores the earlier update wins.

Blanchard et al.'s guarantee needs ``n >= 2f + 3`` updates. With fewer, down
to ``f + 2``, the rule still runs against one neighbour and logs a warning
that the guarantee does not hold. Below ``f + 2`` it raises AggregationError.
Distances cover the delta only; a kept site's extras (SCAFFOLD's control
delta) travel with it.
"""

import logging
from collections.abc import Sequence

import numpy as np

from medfed.aggregation.params import require_int
from medfed.aggregation.strategies.base import (
    SiteUpdate,
    Strategy,
    UpdateSum,
    sum_updates,
)
from medfed.aggregation.wrappers.base import register_wrapper
from medfed.aggregation.wrappers.robust import RobustRule
from medfed.errors import AggregationError

__all__ = ["Krum", "MultiKrum", "krum_scores"]

logger = logging.getLogger(__name__)


def krum_scores(updates: Sequence[SiteUpdate], byzantine: int) -> np.ndarray:
    """Return each update's Krum score, shape (n,).

    Raises:
        AggregationError: fewer than ``byzantine + 2`` updates.
    """
    count = len(updates)
    if count < byzantine + 2:
        raise AggregationError(
            f"Krum with f={byzantine} needs at least {byzantine + 2} updates "
            f"(f + 2), got {count}; lower f or wait for more sites"
        )
    if count < 2 * byzantine + 3:
        logger.warning(
            "Krum with f=%d over %d updates: its guarantee needs %d (2f + 3), "
            "so a Byzantine update may still be kept",
            byzantine, count, 2 * byzantine + 3,
        )  # fmt: skip
    flat = np.stack(
        [
            np.concatenate(
                [
                    np.asarray(u.delta[key], np.float64).ravel()
                    for key in sorted(u.delta)
                ]
            )
            for u in updates
        ]
    )
    squared_norms = np.sum(flat**2, axis=1)
    distances = squared_norms[:, None] + squared_norms[None, :] - 2 * flat @ flat.T
    # Rounding can make a tiny squared distance negative.
    distances = np.maximum(distances, 0.0)
    neighbours = max(1, count - byzantine - 2)
    scores = np.empty(count)
    for index in range(count):
        others = np.delete(distances[index], index)
        scores[index] = np.sum(np.sort(others)[:neighbours])
    return scores


@register_wrapper
class MultiKrum(RobustRule):
    """Keeps the ``m`` updates of lowest Krum score and averages them.

    Args:
        inner: the strategy that applies the combined delta.
        f: number of Byzantine sites tolerated, >= 0.
        m: number of updates kept, >= 1; capped at ``n - f`` in a round.
    """

    name = "multi_krum"

    def __init__(self, inner: Strategy, *, f: int = 1, m: int = 2) -> None:
        super().__init__(inner)
        self.byzantine = require_int("f", f, minimum=0)
        self.kept_count = require_int("m", m, minimum=1)

    def combine(self, updates: Sequence[SiteUpdate]) -> UpdateSum:
        scores = krum_scores(updates, self.byzantine)
        kept = min(self.kept_count, len(updates) - self.byzantine)
        # A stable sort keeps the earlier update among equal scores, so
        # identical updates give a deterministic choice.
        order = np.argsort(scores, kind="stable")[:kept]
        chosen = sorted(int(index) for index in order)
        rejected = sorted(
            update.site for index, update in enumerate(updates) if index not in chosen
        )
        if rejected:
            logger.info("%s left out the updates of sites %s", self.name, rejected)
        return sum_updates([updates[index] for index in chosen])


@register_wrapper
class Krum(MultiKrum):
    """Keeps the single update of lowest Krum score.

    Args:
        inner: the strategy that applies the combined delta.
        f: number of Byzantine sites tolerated, >= 0.
    """

    name = "krum"

    def __init__(self, inner: Strategy, *, f: int = 1) -> None:
        super().__init__(inner, f=f, m=1)
