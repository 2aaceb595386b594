"""Buffered asynchronous aggregation with staleness weighting.

Sites train from whatever global version they last downloaded and upload when
done. The server buffers the updates and aggregates every ``buffer_size``
arrivals (FedBuff: Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022). An update computed from version
``v`` that arrives when the server is at version ``t`` has staleness
``t - v`` and its delta is scaled by ``(1 + staleness) ** -staleness_exponent``
(``1 / sqrt(1 + staleness)`` by default) before the study's strategy
aggregates the buffer, so stale updates count less but are not renormalized
away.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfed.aggregation.params import require_float, require_int
from medfed.aggregation.strategies.base import SiteUpdate, Strategy, Weights
from medfed.errors import AggregationError

__all__ = ["BufferedAggregator", "buffer_size_conflict", "staleness_weight"]

logger = logging.getLogger(__name__)


def buffer_size_conflict(
    buffer_size: int, wrappers: Sequence[tuple[str, Mapping[str, Any]]]
) -> str | None:
    """Return why a wrapper cannot aggregate ``buffer_size`` updates, or None.

    Krum and multi-Krum with ``f`` Byzantine sites need ``f + 2`` updates in
    each aggregation (``krum_scores``), so a smaller buffer never publishes.
    """
    for name, params in wrappers:
        if name not in ("krum", "multi_krum"):
            continue
        # 1 is the default f of Krum and MultiKrum.
        byzantine = params.get("f", 1)
        if isinstance(byzantine, int) and buffer_size < byzantine + 2:
            return (
                f"{name} with f={byzantine} needs at least {byzantine + 2} updates "
                f"per version, more than buffer_size {buffer_size}; raise "
                f"buffer_size to {byzantine + 2} or lower f"
            )
    return None


def staleness_weight(staleness: int, *, exponent: float = 0.5) -> float:
    """Return ``(1 + staleness) ** -exponent``, the scale of a stale delta."""
    staleness = require_int("staleness", staleness, minimum=0)
    exponent = require_float("staleness_exponent", exponent, minimum=0.0)
    return float((1 + staleness) ** -exponent)


class BufferedAggregator:
    """Holds the global model and aggregates every ``buffer_size`` arrivals.

    Args:
        strategy: the study's strategy, wrappers included.
        initial_weights: global model version 0.
        buffer_size: number of arrivals per aggregation (K), >= 1.
        staleness_exponent: exponent of the staleness weight, >= 0.
        max_staleness: arrivals staler than this are rejected; None keeps all.
    """

    def __init__(
        self,
        strategy: Strategy,
        initial_weights: Mapping[str, np.ndarray],
        *,
        buffer_size: int,
        staleness_exponent: float = 0.5,
        max_staleness: int | None = None,
    ) -> None:
        self.strategy = strategy
        self.buffer_size = require_int("buffer_size", buffer_size, minimum=1)
        self.staleness_exponent = require_float(
            "staleness_exponent", staleness_exponent, minimum=0.0
        )
        self.max_staleness = (
            None
            if max_staleness is None
            else require_int("max_staleness", max_staleness, minimum=0)
        )
        self.weights: Weights = {
            key: np.asarray(value, np.float32).copy()
            for key, value in initial_weights.items()
        }
        self.version = 0
        self._buffer: list[SiteUpdate] = []

    @property
    def buffered(self) -> int:
        """Number of arrivals waiting for the next aggregation."""
        return len(self._buffer)

    def submit(self, update: SiteUpdate, *, base_version: int) -> bool:
        """Buffer ``update``, trained from ``base_version``; aggregate when full.

        Returns:
            True when this arrival completed a buffer and produced a new
            global version, False when it was buffered or rejected as too stale.

        Raises:
            AggregationError: ``base_version`` is newer than the current
                version, or the aggregation failed; the buffer, this arrival
                included, is then kept for the next attempt.
        """
        base_version = require_int("base_version", base_version, minimum=0)
        if base_version > self.version:
            raise AggregationError(
                f"site {update.site!r} trained from version {base_version}, but "
                f"the latest global version is {self.version}"
            )
        staleness = self.version - base_version
        if self.max_staleness is not None and staleness > self.max_staleness:
            logger.warning(
                "rejected the update of site %s: staleness %s exceeds %s",
                update.site,
                staleness,
                self.max_staleness,
            )
            return False
        scale = staleness_weight(staleness, exponent=self.staleness_exponent)
        scaled = {
            key: np.asarray(value, np.float64) * scale
            for key, value in update.delta.items()
        }
        self._buffer.append(
            SiteUpdate(update.site, scaled, update.sample_count, update.extras)
        )
        if len(self._buffer) < self.buffer_size:
            return False
        self.weights = self.strategy.aggregate(self.weights, self._buffer)
        self.version += 1
        self._buffer = []
        logger.info("published asynchronous global version %s", self.version)
        return True
