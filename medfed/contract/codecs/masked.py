"""The masked codec: ring elements of a secure-aggregation round, as they are.

A site masks its update with ``medfed.contract.secagg.MaskingSite``, which
returns one array of ring elements (``uint32`` or ``uint64``) per tensor, and
this codec carries them through the envelope unchanged. The header's codec
parameters name the round's ring and fixed-point scale so the service can
check that every upload agrees with the round before it sums them.

One masked payload means nothing on its own, so ``decode`` does not return
float32 tensors: it returns the ring arrays after checking their shapes and
dtype. The service reads them with ``decode_envelope`` as usual, passes the
joined vector to ``MaskingServer.add_masked_update`` and decodes only the
unmasked sum. Because the ring encoding is a separate step, any integer
quantizer that uses one scale for the whole round can replace the
fixed-point encoder before masking.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from medfed.contract.codecs.base import Codec, TensorSpec, register_codec, require_array
from medfed.contract.secagg.ring import DEFAULT_RING_BITS, ring_dtype
from medfed.errors import ConfigError, EnvelopeError

__all__ = ["MaskedCodec"]


@register_codec
class MaskedCodec(Codec):
    """Carries masked ring elements; decoding yields ring arrays, not floats.

    Args:
        ring_bits: 32 or 64.
        fractional_bits: the fixed-point scale exponent of the round.
    """

    name = "masked"

    def __init__(
        self, *, ring_bits: int = DEFAULT_RING_BITS, fractional_bits: int
    ) -> None:
        self.dtype = ring_dtype(ring_bits)
        if not isinstance(fractional_bits, int) or not 0 <= fractional_bits <= 52:
            raise ConfigError(
                "fractional_bits must be an integer from 0 to 52, "
                f"got {fractional_bits!r}"
            )
        self.ring_bits = ring_bits
        self.fractional_bits = fractional_bits

    @property
    def params(self) -> dict[str, Any]:
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
