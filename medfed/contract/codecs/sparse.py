"""Helpers shared by the sparsifying codecs (topk, randk).

A sparse tensor travels as ``<name>.values`` (the kept values, float32 or
float16) and, for topk, ``<name>.indices`` (int32 positions in the flattened
tensor). Every other coordinate decodes to zero.
"""

import numpy as np

from medfed.contract.codecs.fp16 import FLOAT16_MAX
from medfed.errors import EnvelopeError

__all__ = ["VALUE_DTYPES", "check_indices", "encode_values", "scatter"]

VALUE_DTYPES = ("float32", "float16")
#: Largest flattened tensor whose positions fit the int32 indices.
MAX_SPARSE_SIZE = 2**31 - 1


def encode_values(codec: str, key: str, values: np.ndarray, dtype: str) -> np.ndarray:
    """Return ``values`` cast to ``dtype``, rejecting float16 overflow."""
    if dtype == "float16" and values.size:
        peak = float(np.abs(values).max())
        if peak > FLOAT16_MAX:
            raise EnvelopeError(
                f"codec {codec!r} cannot encode tensor {key!r} with float16 "
                f"values: it keeps a value of magnitude {peak}, above the float16 "
                f"maximum {FLOAT16_MAX}; set value_dtype to float32"
            )
    return np.ascontiguousarray(values, dtype=dtype)


def check_indices(field: str, indices: np.ndarray, size: int) -> None:
    """Raise EnvelopeError unless ``indices`` are distinct positions below ``size``."""
    if not indices.size:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= size:
        raise EnvelopeError(
            f"payload array {field!r} contains an index outside [0, {size}) for a "
            f"tensor of {size} elements"
        )
    ordered = np.sort(indices)
    if (ordered[1:] == ordered[:-1]).any():
        raise EnvelopeError(f"payload array {field!r} contains a duplicate index")


def scatter(
    size: int, indices: np.ndarray, values: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Return a float32 tensor of ``shape``, zero except ``values`` at ``indices``."""
    flat = np.zeros(size, dtype=np.float32)
    flat[indices] = values.astype(np.float32)
    return flat.reshape(shape)
