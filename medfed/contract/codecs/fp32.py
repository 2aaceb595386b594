"""The identity codec: float32 tensors as they are."""

from collections.abc import Mapping

import numpy as np

from medfed.contract.codecs.base import Codec, TensorSpec, register_codec, require_array

__all__ = ["Float32Codec"]


@register_codec
class Float32Codec(Codec):
    """Sends each tensor as float32, losslessly."""

    name = "fp32"

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            key: np.ascontiguousarray(value, np.float32)
            for key, value in update.items()
        }

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        return {
            name: require_array(payload, name, shape, "float32")
            for name, shape, _ in specs
        }
