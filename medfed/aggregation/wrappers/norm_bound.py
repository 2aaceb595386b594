"""Norm bounding: clip each site's delta to a maximum L2 norm.

Bounding the norm caps how far one site (a faulty or poisoned one) can move
the mean, at the cost of shrinking honest updates that exceed the bound
(Sun et al., "Can You Really Backdoor Federated Learning?", 2019).
"""

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from medfed.aggregation.params import require_float
from medfed.aggregation.strategies.base import SiteUpdate, Strategy, UpdateSum, Weights
from medfed.aggregation.wrappers.base import StrategyWrapper, register_wrapper
from medfed.aggregation.wrappers.clipping import clip_update

__all__ = ["NormBound"]

logger = logging.getLogger(__name__)


@register_wrapper
class NormBound(StrategyWrapper):
    """Clips every delta to ``max_norm`` before the inner strategy sees it.

    Args:
        inner: the strategy to wrap.
        max_norm: L2 bound on one site's delta over all its tensors, > 0.
    """

    name = "norm_bound"

    def __init__(self, inner: Strategy, *, max_norm: float) -> None:
        super().__init__(inner)
        self.max_norm = require_float(
            "max_norm", max_norm, minimum=0.0, exclusive_minimum=True
        )

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]
    ) -> Weights:
        clipped_updates = []
        for update in updates:
            delta, norm = clip_update(update.delta, max_norm=self.max_norm)
            if norm > self.max_norm:
                logger.info(
                    "clipped the delta of site %s from norm %.4g to %.4g",
                    update.site,
                    norm,
                    self.max_norm,
                )
            clipped_updates.append(
                SiteUpdate(update.site, delta, update.sample_count, update.extras)
            )
        return self.inner.aggregate(global_weights, clipped_updates)

    def aggregate_sum(
        self, global_weights: Mapping[str, np.ndarray], summed: UpdateSum
    ) -> Weights:
        # NOTE: from a sum the server cannot check the bound; it relies on the
        # sites clipping to ``site_settings()["clip_norm"]`` before masking.
        return self.inner.aggregate_sum(global_weights, summed)

    def site_settings(self) -> dict[str, float]:
        settings = dict(self.inner.site_settings())
        settings["clip_norm"] = min(settings.get("clip_norm", np.inf), self.max_norm)
        return settings
