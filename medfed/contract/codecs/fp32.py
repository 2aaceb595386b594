"""The identity codec: float32 tensors as they are."""

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

__all__ = ["Float32Codec"]


@register_codec
class Float32Codec(Codec):
    """Sends each tensor as float32, losslessly."""

    name = "fp32"

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The identity codec passes NaN through, and the decoder rejects it,
        # so a NaN envelope can still be built to test the service.
        return {
            key: check_update_tensor(self.name, key, value, require_finite=False)
            for key, value in update.items()
        }

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        require_keys(payload, (name for name, _, _ in specs))
        return {
            name: require_array(payload, name, shape, "float32")
            for name, shape, _ in specs
        }
