"""One canonical order for flattening an update into a vector.

Pairwise masks cancel only when every site adds them to the same coordinates,
so every site and the aggregation service flatten tensors in sorted name
order, each in C order.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medfed.errors import SecureAggregationError

__all__ = ["VectorLayout"]


@dataclass(frozen=True)
class VectorLayout:
    """The names and shapes of a model's tensors, in flattening order."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "VectorLayout":
        return cls(tuple((name, tuple(shapes[name])) for name in sorted(shapes)))

    @classmethod
    def of(cls, update: Mapping[str, np.ndarray]) -> "VectorLayout":
        """Return the layout of ``update``'s tensors."""
        return cls.from_shapes(
            {name: np.shape(value) for name, value in update.items()}
        )

    @property
    def length(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    def flatten(self, update: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate ``update``'s tensors into one float64 vector.

        Raises:
            SecureAggregationError: a tensor is missing, extra or misshapen.
        """
        self._check_names(update)
        parts = []
        for name, shape in self.shapes:
            value = np.asarray(update[name])
            if value.shape != shape:
                raise SecureAggregationError(
                    f"tensor {name!r} has shape {list(value.shape)}, expected "
                    f"{list(shape)}"
                )
            parts.append(value.astype(np.float64).ravel())
        return np.concatenate(parts) if parts else np.zeros(0)

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Cut a flat vector back into named tensors, keeping its dtype."""
        if vector.shape != (self.length,):
            raise SecureAggregationError(
                f"vector has shape {list(vector.shape)}, expected [{self.length}]"
            )
        tensors = {}
        offset = 0
        for name, shape in self.shapes:
            size = math.prod(shape)
            tensors[name] = vector[offset : offset + size].reshape(shape)
            offset += size
        return tensors

    def join(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate tensors of any one dtype (ring elements) in layout order."""
        self._check_names(tensors)
        parts = []
        for name, shape in self.shapes:
            if tensors[name].shape != shape:
                raise SecureAggregationError(
                    f"tensor {name!r} has shape {list(tensors[name].shape)}, "
                    f"expected {list(shape)}"
                )
            parts.append(np.ravel(tensors[name]))
        return np.concatenate(parts)

    def _check_names(self, tensors: Mapping[str, np.ndarray]) -> None:
        expected = {name for name, _ in self.shapes}
        missing = sorted(expected - set(tensors))
        extra = sorted(set(tensors) - expected)
        if missing or extra:
            raise SecureAggregationError(
                f"update tensors do not match the round's layout: missing {missing}, "
                f"unexpected {extra}"
            )
