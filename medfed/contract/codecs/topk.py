"""Top-k sparsification: each tensor keeps its largest-magnitude values.

Per tensor of d elements, the codec keeps ``k = kept_count(fraction, d)``
values (``fraction * d`` rounded half up, at least 1) and sends their int32
positions in the flattened tensor and their values. Error bound per element:
a kept value is exact in float32 (float16 adds the fp16 codec's rounding),
and a dropped value is zeroed, so its error is at most the smallest kept
magnitude. The codec is biased; pair it with error feedback at the site.

Not dense, so it does not compose with masking secure aggregation.
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
    check_choice,
    check_number,
    check_update_tensor,
    kept_count,
)
from medfed.contract.codecs.sparse import (
    MAX_SPARSE_SIZE,
    VALUE_DTYPES,
    check_indices,
    encode_values,
    scatter,
)
from medfed.errors import EnvelopeError

__all__ = ["TopKCodec"]


@register_codec
class TopKCodec(Codec):
    """Keeps the ``fraction`` of each tensor's values with the largest magnitude."""

    name = "topk"
    linear = False
    dense = False

    def __init__(self, *, fraction: float, value_dtype: str = "float32") -> None:
        """Validate the parameters.

        Args:
            fraction: share of each tensor's elements to keep, in (0, 1].
            value_dtype: "float32" or "float16" for the kept values.
        """
        self.fraction = check_number(
            self.name, "fraction", fraction, above=0.0, at_most=1.0
        )
        self.value_dtype = check_choice(
            self.name, "value_dtype", value_dtype, VALUE_DTYPES
        )

    @property
    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "value_dtype": self.value_dtype}

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return sorted int32 ``<name>.indices`` and ``<name>.values`` per tensor."""
        arrays = {}
        for key, value in update.items():
            flat = check_update_tensor(self.name, key, value).reshape(-1)
            if flat.size > MAX_SPARSE_SIZE:
                raise EnvelopeError(
                    f"codec 'topk' cannot encode tensor {key!r}: its {flat.size} "
                    f"elements exceed the int32 index range"
                )
            kept = kept_count(self.fraction, flat.size)
            if kept == flat.size:
                indices = np.arange(flat.size)
            else:
                indices = np.argpartition(np.abs(flat), flat.size - kept)[-kept:]
                indices.sort()
            arrays[f"{key}.indices"] = indices.astype(np.int32)
            arrays[f"{key}.values"] = encode_values(
                self.name, key, flat[indices], self.value_dtype
            )
        return arrays

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        require_keys(
            payload,
            (
                name + suffix
                for name, _, _ in specs
                for suffix in (".indices", ".values")
            ),
        )
        tensors = {}
        for name, shape, _ in specs:
            size = math.prod(shape)
            kept = kept_count(self.fraction, size)
            indices = require_array(payload, f"{name}.indices", (kept,), "int32")
            values = require_array(payload, f"{name}.values", (kept,), self.value_dtype)
            check_indices(f"{name}.indices", indices, size)
            tensors[name] = scatter(size, indices, values, shape)
        return tensors
