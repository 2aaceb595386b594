"""Helpers shared by the sparsifying codecs (topk, randk).

A sparse tensor travels as ``<name>.values`` (the kept values, float32 or
float16, or int8 levels for topk) and, for topk, the kept positions in the
flattened tensor: ``<name>.indices`` (int32) or ``<name>.bitmap`` (one bit
per element, see ``pack_bitmap``). Every other coordinate decodes to zero.
"""

import numpy as np

from medfed.contract.codecs.fp16 import FLOAT16_MAX
from medfed.errors import EnvelopeError

__all__ = [
    "VALUE_DTYPES",
    "bitmap_length",
    "check_indices",
    "encode_values",
    "pack_bitmap",
    "scatter",
    "unpack_bitmap",
]

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


def bitmap_length(size: int) -> int:
    """Return the bytes of the bitmap of a tensor of ``size`` elements."""
    return -(-size // 8)


def pack_bitmap(positions: np.ndarray, size: int) -> np.ndarray:
    """Return a uint8 bitmap of ``size`` bits with the bits at ``positions`` set.

    Bit order is little: element i is bit ``i % 8`` (value ``1 << (i % 8)``)
    of byte ``i // 8``, as ``np.packbits(..., bitorder="little")`` writes it.
    The bits after the last element in the final byte are zero.
    """
    mask = np.zeros(size, dtype=bool)
    mask[positions] = True
    return np.packbits(mask, bitorder="little")


def unpack_bitmap(field: str, bitmap: np.ndarray, size: int, kept: int) -> np.ndarray:
    """Return the boolean mask of ``size`` elements that ``bitmap`` marks.

    The checks run on the ``bitmap_length(size)`` bytes before the mask of
    ``size`` booleans is allocated.

    Raises:
        EnvelopeError: ``bitmap`` is not ``bitmap_length(size)`` uint8 bytes,
            a padding bit after element ``size - 1`` is set, or the number of
            set bits differs from ``kept``.
    """
    expected = bitmap_length(size)
    if bitmap.dtype != np.uint8 or bitmap.shape != (expected,):
        raise EnvelopeError(
            f"payload array {field!r} has dtype {bitmap.dtype} and shape "
            f"{list(bitmap.shape)}, expected uint8 and [{expected}] for a tensor "
            f"of {size} elements"
        )
    used_bits = size % 8
    if used_bits and int(bitmap[-1]) >> used_bits:
        raise EnvelopeError(
            f"payload array {field!r} has a padding bit set after element "
            f"{size - 1}; the bits after the last element must be zero"
        )
    marked = int(np.bitwise_count(bitmap).sum(dtype=np.int64))
    if marked != kept:
        raise EnvelopeError(
            f"payload array {field!r} marks {marked} positions, expected {kept} "
            f"kept values for a tensor of {size} elements"
        )
    return np.unpackbits(bitmap, count=size, bitorder="little").view(bool)


def scatter(
    size: int, indices: np.ndarray, values: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Return a float32 tensor of ``shape``, zero except ``values`` at ``indices``.

    ``indices`` is an integer array of positions, or a boolean mask of
    ``size`` elements whose set positions take ``values`` in ascending order.
    """
    flat = np.zeros(size, dtype=np.float32)
    flat[indices] = values.astype(np.float32)
    return flat.reshape(shape)
