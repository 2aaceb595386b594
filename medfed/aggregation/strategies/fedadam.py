"""FedAdam: Adam on the server (Reddi et al., 2021)."""

import numpy as np

from medfed.aggregation.strategies.base import register_strategy
from medfed.aggregation.strategies.server_optimizer import AdaptiveServerOptimizer

__all__ = ["FedAdam"]


@register_strategy
class FedAdam(AdaptiveServerOptimizer):
    """Second moment ``v = beta2 * v + (1 - beta2) * g ** 2``.

    Hyperparameters as in ``AdaptiveServerOptimizer``.
    """

    name = "fedadam"

    def second_moment(
        self, previous: np.ndarray, squared_gradient: np.ndarray
    ) -> np.ndarray:
        return self.beta2 * previous + (1 - self.beta2) * squared_gradient
