"""Low-bit dense quantizer: 8, 4 or 2 bits per value with stochastic rounding.

Each value x becomes a level q in ``[-level_max, level_max]`` with
``level_max = 2**(bits - 1) - 1`` (127, 7 or 1, so 2 bits send the ternary
levels -1, 0, 1). Each tensor, or each run of ``chunk_size`` elements of the
flattened tensor, gets ``scale = max|x| / level_max`` (rounded up to a
float32), so no value is clipped. Rounding is the int8 codec's stochastic
rounding, ``q = floor(x / scale + u)`` with u uniform on [0, 1):
``E[q * scale] = x`` (unbiased) and ``|q * scale - x| < scale`` per element,
up to the float32 rounding of the decoded product (relative 2**-24). The
variance per element is at most ``scale**2 / 4``.

Wire form per tensor of d elements:

- ``<name>.codes``: uint8, ``ceil(d * bits / 8)`` bytes. Each level travels
  as the code ``q + level_max`` in ``bits`` bits, ``8 / bits`` codes per
  byte in little order: element i sits at bit ``(i % (8 / bits)) * bits`` of
  byte ``i // (8 / bits)``. The all-ones code (255, 15 or 3) is never sent,
  so the range is symmetric, and the bits after the last code are zero.
- ``<name>.scale``: float32, one per chunk.

At 2 bits a tensor costs ``d / 4`` bytes plus 4 per chunk: 16x fewer bytes
than fp32 with one scale per tensor, about 15x with ``chunk_size`` 256.

Why a codec of its own rather than a ``bits`` parameter on ``int8``: the
int8 codec's wire form is int8 levels shaped like the tensor, and its
shared-scale mode is the ring encoding of masking secure aggregation
(``medfed.contract.secagg.int8_ring``, 127 levels). Under masking every
level costs a 32-bit ring word whatever its width, so 4 or 2 bits there
would add rounding error and save no bytes. This codec has no shared scale
and is rejected under masking (see ``compatibility``), and the name int8
keeps meaning 8 bits.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from medfed.contract.codecs.base import (
    Codec,
    TensorSpec,
    register_codec,
    require_array,
    require_keys,
)
from medfed.contract.codecs.params import (
    MAX_SEED,
    check_integer,
    check_update_tensor,
)
from medfed.contract.codecs.quantize import (
    check_scales,
    chunk_count,
    dequantize,
    quantize_chunks,
)
from medfed.errors import ConfigError, EnvelopeError

__all__ = [
    "BIT_WIDTHS",
    "LowBitCodec",
    "level_max",
    "pack_codes",
    "packed_length",
    "unpack_codes",
]

BIT_WIDTHS = (8, 4, 2)
_MAX_CHUNK_SIZE = 2**31 - 1


def level_max(bits: int) -> int:
    """Return the largest level magnitude at ``bits`` bits: 127, 7 or 1."""
    return 2 ** (bits - 1) - 1


def packed_length(size: int, bits: int) -> int:
    """Return the bytes that ``size`` codes of ``bits`` bits take."""
    return -(-size * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes below ``2**bits`` into bytes, ``8 / bits`` per byte.

    Code i goes to bit ``(i % (8 / bits)) * bits`` of byte ``i // (8 / bits)``.
    """
    per_byte = 8 // bits
    padded = np.zeros(packed_length(codes.size, bits) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    shifted = padded.reshape(-1, per_byte) << shifts
    return np.bitwise_or.reduce(shifted, axis=1).astype(np.uint8)


def unpack_codes(field: str, packed: np.ndarray, bits: int, size: int) -> np.ndarray:
    """Return the ``size`` codes of ``bits`` bits in ``packed``.

    Raises:
        EnvelopeError: ``packed`` is not ``packed_length(size, bits)`` uint8
            bytes, a padding bit after the last code is set, or a code is
            the all-ones pattern, which the encoder never sends.
    """
    expected = packed_length(size, bits)
    if packed.dtype != np.uint8 or packed.shape != (expected,):
        raise EnvelopeError(
            f"payload array {field!r} has dtype {packed.dtype} and shape "
            f"{list(packed.shape)}, expected uint8 and [{expected}] for "
            f"{size} codes of {bits} bits"
        )
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    mask = np.uint8(2**bits - 1)
    codes = ((packed[:, np.newaxis] >> shifts) & mask).reshape(-1)
    if codes[size:].any():
        raise EnvelopeError(
            f"payload array {field!r} has a padding bit set after code {size - 1}; "
            "the bits after the last code must be zero"
        )
    codes = codes[:size]
    if codes.size and int(codes.max()) == 2**bits - 1:
        raise EnvelopeError(
            f"payload array {field!r} contains the code {2**bits - 1}, but "
            f"{bits}-bit codes must lie in [0, {2 * level_max(bits)}]"
        )
    return codes


@register_codec
class LowBitCodec(Codec):
    """Quantizes each value to 8, 4 or 2 bits with a per-tensor or per-chunk scale."""

    name = "lowbit"
    linear = False

    def __init__(
        self, *, bits: int, chunk_size: int = 0, seed: int | None = None
    ) -> None:
        """Validate the parameters.

        Args:
            bits: bits per value, 8, 4 or 2.
            chunk_size: elements that share one scale, counted along the
                flattened tensor, or 0 for one scale per tensor.
            seed: seed of the stochastic rounding, for reproducible tests.
                None draws fresh randomness from the operating system. It is
                not part of ``params`` because the decoder does not need it.
        """
        self.bits = check_integer(self.name, "bits", bits, minimum=2, maximum=8)
        if self.bits not in BIT_WIDTHS:
            raise ConfigError(
                f"codec 'lowbit' parameter bits must be one of "
                f"{', '.join(str(width) for width in BIT_WIDTHS)}, got {bits!r}"
            )
        self.chunk_size = check_integer(
            self.name, "chunk_size", chunk_size, minimum=0, maximum=_MAX_CHUNK_SIZE
        )
        if seed is not None:
            check_integer(self.name, "seed", seed, minimum=0, maximum=MAX_SEED)
        self._rng = np.random.default_rng(seed)

    @property
    def params(self) -> dict[str, Any]:
        return {"bits": self.bits, "chunk_size": self.chunk_size}

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return ``<name>.codes`` (packed uint8) and ``<name>.scale`` per tensor."""
        largest_level = level_max(self.bits)
        arrays: dict[str, np.ndarray] = {}
        for key, value in update.items():
            flat = check_update_tensor(self.name, key, value).reshape(-1)
            levels, scales = quantize_chunks(
                flat, self.chunk_size, largest_level, self._rng
            )
            codes = (levels + largest_level).astype(np.uint8)
            arrays[f"{key}.codes"] = pack_codes(codes, self.bits)
            arrays[f"{key}.scale"] = scales
        return arrays

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        require_keys(
            payload,
            (name + suffix for name, _, _ in specs for suffix in (".codes", ".scale")),
        )
        largest_level = level_max(self.bits)
        tensors = {}
        for name, shape, _ in specs:
            size = math.prod(shape)
            packed = require_array(
                payload, f"{name}.codes", (packed_length(size, self.bits),), "uint8"
            )
            scales = require_array(
                payload,
                f"{name}.scale",
                (chunk_count(size, self.chunk_size),),
                "float32",
            )
            check_scales(f"{name}.scale", scales)
            codes = unpack_codes(f"{name}.codes", packed, self.bits, size)
            levels = codes.astype(np.int16) - largest_level
            tensors[name] = dequantize(levels, scales, self.chunk_size).reshape(shape)
        return tensors
