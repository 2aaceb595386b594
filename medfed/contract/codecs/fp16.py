"""Half-precision codec: each value rounded to the nearest float16.

Error bound per element, for round-to-nearest-even on IEEE binary16:
``|decoded - x| <= max(|x| * 2**-11, 2**-25)``. The first term is half a unit
in the last place of a normal float16 (11 significant bits). The second is
half the subnormal spacing 2**-24, which covers values below 2**-14.
"""

from collections.abc import Mapping

import numpy as np

from medfed.contract.codecs.base import (
    Codec,
    TensorSpec,
    register_codec,
    require_array,
    require_keys,
)
from medfed.contract.codecs.params import check_update_tensor
from medfed.errors import EnvelopeError

__all__ = ["FLOAT16_MAX", "Float16Codec"]

#: Largest finite float16. Larger magnitudes would round to infinity.
FLOAT16_MAX = float(np.finfo(np.float16).max)


@register_codec
class Float16Codec(Codec):
    """Sends each tensor as float16, halving the payload of fp32.

    Not linear for masking: float16 bit patterns cannot be summed in a ring.
    """

    name = "fp16"
    linear = False

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return each tensor rounded to float16, under its own name.

        Raises:
            EnvelopeError: a tensor is not finite float, or contains a magnitude
                above ``FLOAT16_MAX`` (65504) that float16 cannot represent.
        """
        arrays = {}
        for key, value in update.items():
            array = check_update_tensor(self.name, key, value)
            if array.size and float(np.abs(array).max()) > FLOAT16_MAX:
                raise EnvelopeError(
                    f"codec 'fp16' cannot encode tensor {key!r}: it contains a value "
                    f"of magnitude {float(np.abs(array).max())}, above the float16 "
                    f"maximum {FLOAT16_MAX}; use fp32 or int8"
                )
            arrays[key] = array.astype(np.float16)
        return arrays

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        require_keys(payload, (name for name, _, _ in specs))
        return {
            name: require_array(payload, name, shape, "float16").astype(np.float32)
            for name, shape, _ in specs
        }
