"""FedAvg: the sample-weighted mean of the site updates (McMahan et al., 2017)."""

from collections.abc import Mapping

import numpy as np

from medfed.aggregation.params import require_float, require_matching_tensors
from medfed.aggregation.strategies.base import Strategy, Weights, register_strategy

__all__ = ["FedAvg", "server_step"]


@register_strategy
class FedAvg(Strategy):
    """Adds the sample-weighted mean delta to the global weights.

    Args:
        server_learning_rate: scale of the mean delta; 1.0 is plain FedAvg.
    """

    name = "fedavg"

    def __init__(self, *, server_learning_rate: float = 1.0) -> None:
        self.server_learning_rate = require_float(
            "server_learning_rate",
            server_learning_rate,
            minimum=0.0,
            exclusive_minimum=True,
        )

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        return server_step(global_weights, mean_delta, self.server_learning_rate)


def server_step(
    global_weights: Mapping[str, np.ndarray],
    mean_delta: Mapping[str, np.ndarray],
    learning_rate: float,
) -> Weights:
    """Return ``global_weights + learning_rate * mean_delta``, computed in float64."""
    require_matching_tensors(global_weights, mean_delta)
    return {
        key: (
            np.asarray(value, np.float64)
            + learning_rate * np.asarray(mean_delta[key], np.float64)
        ).astype(np.float32)
        for key, value in global_weights.items()
    }
