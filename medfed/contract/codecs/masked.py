"""The masked codec: ring elements of a secure-aggregation round, as they are.

A site masks its update with ``medfed.contract.secagg.MaskingSite``, which
returns one array of ring elements (``uint32`` or ``uint64``) per tensor, and
this codec carries them through the envelope unchanged. The header's codec
parameters name the round's ring and its scale, either ``fractional_bits``
(fixed point) or ``int8_scale`` (int8 levels at the study's shared scale,
``medfed.contract.secagg.int8_ring``), so the service can check that every
upload agrees with the round before it sums them.

One masked payload means nothing on its own, so ``decode`` does not return
float32 tensors: it returns the ring arrays after checking their shapes and
dtype. The service reads them with ``decode_envelope`` as usual, passes the
joined vector to ``MaskingServer.add_masked_update`` and decodes only the
unmasked sum.
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from medfed.contract.codecs.base import Codec, TensorSpec, register_codec, require_array
from medfed.contract.codecs.params import check_number
from medfed.contract.secagg.ring import DEFAULT_RING_BITS, ring_dtype
from medfed.errors import ConfigError, EnvelopeError

__all__ = ["MaskedCodec"]


@register_codec
class MaskedCodec(Codec):
    """Carries masked ring elements; decoding yields ring arrays, not floats.

    Args:
        ring_bits: 32 or 64.
        fractional_bits: the fixed-point scale exponent of the round.
        int8_scale: the shared int8 scale of the round, in place of
            ``fractional_bits``.
    """

    name = "masked"

    def __init__(
        self,
        *,
        ring_bits: int = DEFAULT_RING_BITS,
        fractional_bits: int | None = None,
        int8_scale: float | None = None,
    ) -> None:
        self.dtype = ring_dtype(ring_bits)
        if (fractional_bits is None) == (int8_scale is None):
            raise ConfigError(
                "codec 'masked' needs exactly one of fractional_bits (fixed point) "
                f"and int8_scale (int8 levels), got fractional_bits "
                f"{fractional_bits!r} and int8_scale {int8_scale!r}"
            )
        if fractional_bits is not None and (
            not isinstance(fractional_bits, int) or not 0 <= fractional_bits <= 52
        ):
            raise ConfigError(
                "fractional_bits must be an integer from 0 to 52, "
                f"got {fractional_bits!r}"
            )
        if int8_scale is not None:
            int8_scale = check_number(
                self.name, "int8_scale", int8_scale, above=0.0, at_most=math.inf
            )
        self.ring_bits = ring_bits
        self.fractional_bits = fractional_bits
        self.int8_scale = int8_scale

    @property
    def params(self) -> dict[str, Any]:
        if self.int8_scale is not None:
            return {"ring_bits": self.ring_bits, "int8_scale": self.int8_scale}
        return {"ring_bits": self.ring_bits, "fractional_bits": self.fractional_bits}

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {}
        for key, value in update.items():
            array = np.asarray(value)
            if array.dtype != self.dtype:
                raise EnvelopeError(
                    f"masked tensor {key!r} has dtype {array.dtype}, expected "
                    f"{self.dtype}: mask it with MaskingSite first"
                )
            arrays[key] = np.ascontiguousarray(array)
        return arrays

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        return {
            name: require_array(payload, name, shape, self.dtype.name)
            for name, shape, _ in specs
        }
