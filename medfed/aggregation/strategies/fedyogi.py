"""FedYogi: Yogi on the server (Reddi et al., 2021)."""

import numpy as np

from medfed.aggregation.strategies.base import register_strategy
from medfed.aggregation.strategies.server_optimizer import AdaptiveServerOptimizer

__all__ = ["FedYogi"]


@register_strategy
class FedYogi(AdaptiveServerOptimizer):
    """Second moment ``v = v - (1 - beta2) * g ** 2 * sign(v - g ** 2)``.

    Unlike Adam, ``v`` moves by at most ``(1 - beta2) * g ** 2`` per round,
    so one large update cannot inflate it abruptly. Hyperparameters as in
    ``AdaptiveServerOptimizer``.
    """

    name = "fedyogi"

    def second_moment(
        self, previous: np.ndarray, squared_gradient: np.ndarray
    ) -> np.ndarray:
        direction = np.sign(previous - squared_gradient)
        return previous - (1 - self.beta2) * squared_gradient * direction
