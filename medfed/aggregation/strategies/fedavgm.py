"""FedAvgM: FedAvg with server momentum (Hsu et al., 2019)."""

from collections.abc import Mapping

import numpy as np

from medfed.aggregation.params import require_float, require_matching_tensors
from medfed.aggregation.strategies.base import Strategy, Weights, register_strategy
from medfed.aggregation.strategies.server_optimizer import load_prefixed_state
from medfed.errors import AggregationError

__all__ = ["FedAvgM"]

_VELOCITY = "velocity/"


@register_strategy
class FedAvgM(Strategy):
    """Heavy-ball momentum on the mean delta, per coordinate::

        velocity = momentum * velocity + mean_delta     # velocity starts at 0
        x = x + server_learning_rate * velocity

    Args:
        server_learning_rate: step size on the server, > 0.
        momentum: decay of the velocity, in [0, 1).
    """

    name = "fedavgm"

    def __init__(
        self, *, server_learning_rate: float = 1.0, momentum: float = 0.9
    ) -> None:
        self.server_learning_rate = require_float(
            "server_learning_rate",
            server_learning_rate,
            minimum=0.0,
            exclusive_minimum=True,
        )
        self.momentum = require_float(
            "momentum", momentum, minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        self._velocity: dict[str, np.ndarray] = {}

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        require_matching_tensors(global_weights, mean_delta)
        velocity: dict[str, np.ndarray] = {}
        result: Weights = {}
        for key, value in global_weights.items():
            weights = np.asarray(value, np.float64)
            previous = self._velocity.get(key, np.zeros(weights.shape))
            if previous.shape != weights.shape:
                raise AggregationError(
                    f"strategy 'fedavgm' has a velocity of shape "
                    f"{list(previous.shape)} for tensor {key!r}, but the global "
                    f"model's has {list(weights.shape)}"
                )
            velocity[key] = self.momentum * previous + np.asarray(
                mean_delta[key], np.float64
            )
            result[key] = (weights + self.server_learning_rate * velocity[key]).astype(
                np.float32
            )
        self._velocity = velocity
        return result

    def state_dict(self) -> dict[str, np.ndarray]:
        return {_VELOCITY + key: value.copy() for key, value in self._velocity.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        (self._velocity,) = load_prefixed_state(self.name, state, (_VELOCITY,))
