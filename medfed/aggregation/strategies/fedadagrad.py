"""FedAdagrad: Adagrad on the server (Reddi et al., 2021)."""

import numpy as np

from medfed.aggregation.strategies.base import register_strategy
from medfed.aggregation.strategies.server_optimizer import AdaptiveServerOptimizer

__all__ = ["FedAdagrad"]


@register_strategy
class FedAdagrad(AdaptiveServerOptimizer):
    """Second moment ``v = v + g ** 2``.

    Args:
        server_learning_rate: step size on the server, > 0.
        beta1: decay of the first moment, in [0, 1).
        tau: adaptivity, > 0.
    """

    name = "fedadagrad"

    def __init__(
        self,
        *,
        server_learning_rate: float = 0.1,
        beta1: float = 0.9,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(
            server_learning_rate=server_learning_rate, beta1=beta1, tau=tau
        )

    def second_moment(
        self, previous: np.ndarray, squared_gradient: np.ndarray
    ) -> np.ndarray:
        return previous + squared_gradient
