"""Shared machinery of the adaptive server optimizers FedAdam, FedYogi, FedAdagrad.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2,
treat the negated mean delta as a pseudo-gradient ``g = -mean_delta`` and run
an adaptive optimizer on the server, per coordinate::

    m = beta1 * m + (1 - beta1) * g          # m starts at 0
    v = second_moment(v, g ** 2)             # v starts at tau ** 2
    x = x - server_learning_rate * m / (sqrt(v) + tau)

without bias correction. The three optimizers differ only in how ``v``
accumulates, which each subclass supplies.
"""

from abc import abstractmethod
from collections.abc import Mapping

import numpy as np

from medfed.aggregation.params import require_float, require_matching_tensors
from medfed.aggregation.strategies.base import Strategy, Weights
from medfed.errors import AggregationError

__all__ = ["AdaptiveServerOptimizer", "load_prefixed_state"]

_FIRST = "first_moment/"
_SECOND = "second_moment/"


class AdaptiveServerOptimizer(Strategy):
    """Base of the server optimizers; subclasses define ``second_moment``.

    Args:
        server_learning_rate: step size on the server, > 0.
        beta1: decay of the first moment, in [0, 1).
        beta2: decay of the second moment, in [0, 1) (unused by FedAdagrad).
        tau: adaptivity: added to sqrt(v) and the square root of v's start, > 0.
    """

    def __init__(
        self,
        *,
        server_learning_rate: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        self.server_learning_rate = require_float(
            "server_learning_rate",
            server_learning_rate,
            minimum=0.0,
            exclusive_minimum=True,
        )
        self.beta1 = require_float(
            "beta1", beta1, minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        self.beta2 = require_float(
            "beta2", beta2, minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        self.tau = require_float("tau", tau, minimum=0.0, exclusive_minimum=True)
        self._first: dict[str, np.ndarray] = {}
        self._second: dict[str, np.ndarray] = {}

    @abstractmethod
    def second_moment(
        self, previous: np.ndarray, squared_gradient: np.ndarray
    ) -> np.ndarray:
        """Return the next second moment from the previous one and ``g ** 2``."""

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        require_matching_tensors(global_weights, mean_delta)
        first: dict[str, np.ndarray] = {}
        second: dict[str, np.ndarray] = {}
        result: Weights = {}
        for key, value in global_weights.items():
            weights = np.asarray(value, np.float64)
            gradient = -np.asarray(mean_delta[key], np.float64)
            previous_first = self._previous(self._first, key, weights.shape, 0.0)
            previous_second = self._previous(
                self._second, key, weights.shape, self.tau**2
            )
            first[key] = self.beta1 * previous_first + (1 - self.beta1) * gradient
            second[key] = self.second_moment(previous_second, gradient**2)
            step = first[key] / (np.sqrt(second[key]) + self.tau)
            result[key] = (weights - self.server_learning_rate * step).astype(
                np.float32
            )
        # Commit the moments only after every tensor succeeded, so a failed
        # round leaves the optimizer as it was.
        self._first, self._second = first, second
        return result

    def _previous(
        self,
        moments: Mapping[str, np.ndarray],
        key: str,
        shape: tuple[int, ...],
        start: float,
    ) -> np.ndarray:
        if key not in moments:
            return np.full(shape, start, np.float64)
        if moments[key].shape != shape:
            raise AggregationError(
                f"strategy {self.name!r} has a moment of shape "
                f"{list(moments[key].shape)} for tensor {key!r}, but the global "
                f"model's has {list(shape)}; the model changed during the study"
            )
        return moments[key]

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {_FIRST + key: value.copy() for key, value in self._first.items()}
        state.update(
            {_SECOND + key: value.copy() for key, value in self._second.items()}
        )
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        first, second = load_prefixed_state(self.name, state, (_FIRST, _SECOND))
        if set(first) != set(second):
            raise AggregationError(
                f"state for strategy {self.name!r} has first moments for "
                f"{sorted(first)} but second moments for {sorted(second)}"
            )
        self._first, self._second = first, second


def load_prefixed_state(
    strategy: str, state: Mapping[str, np.ndarray], prefixes: tuple[str, ...]
) -> list[dict[str, np.ndarray]]:
    """Split ``state`` by key prefix into float64 dicts, one per prefix.

    Raises:
        AggregationError: a key has none of the prefixes, or a value is not a
            finite numeric array.
    """
    parts: list[dict[str, np.ndarray]] = [{} for _ in prefixes]
    for key, value in state.items():
        index = next(
            (i for i, prefix in enumerate(prefixes) if key.startswith(prefix)), None
        )
        if index is None:
            raise AggregationError(
                f"unexpected key {key!r} in the state for strategy {strategy!r}; "
                f"keys start with one of {list(prefixes)}"
            )
        array = np.asarray(value)
        if array.dtype.kind not in "fiu" or not np.all(np.isfinite(array)):
            raise AggregationError(
                f"state entry {key!r} for strategy {strategy!r} must be a finite "
                f"numeric array, got dtype {array.dtype}"
            )
        parts[index][key.removeprefix(prefixes[index])] = array.astype(np.float64)
    return parts
