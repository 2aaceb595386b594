"""FedAvg: the sample-weighted mean of the site updates (McMahan et al., 2017)."""

from collections.abc import Mapping

import numpy as np

from medfed.aggregation.strategies.base import Strategy, Weights, register_strategy

__all__ = ["FedAvg"]


@register_strategy
class FedAvg(Strategy):
    """Adds the sample-weighted mean delta to the global weights.

    Args:
        server_learning_rate: scale of the mean delta; 1.0 is plain FedAvg.
    """

    name = "fedavg"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        if not server_learning_rate > 0:
            raise ValueError(
                f"server_learning_rate must be > 0, got {server_learning_rate}"
            )
        self.server_learning_rate = server_learning_rate

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        return {
            key: (
                np.asarray(value, np.float64)
                + self.server_learning_rate * np.asarray(mean_delta[key], np.float64)
            ).astype(np.float32)
            for key, value in global_weights.items()
        }
