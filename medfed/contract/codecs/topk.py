"""Top-k sparsification: each tensor keeps its largest-magnitude values.

Per tensor of d elements, the codec keeps ``k = kept_count(fraction, d)``
values (``fraction * d`` rounded half up, at least 1) and sends their
positions in the flattened tensor and their values.

Positions (``index_encoding``):

- ``int32``: ``<name>.indices``, the k sorted positions, 4 bytes each.
- ``bitmap``: ``<name>.bitmap``, ``ceil(d / 8)`` uint8 bytes with bit i set
  when element i is kept, in little bit order (element i is bit ``i % 8`` of
  byte ``i // 8``, as ``np.packbits(..., bitorder="little")`` packs it).
  Values follow in ascending position order. The bitmap is smaller than the
  indices when ``fraction`` exceeds 1/32.

Values (``value_dtype``):

- ``float32``: exact.
- ``float16``: the fp16 codec's rounding, ``|error| <= max(|x| * 2**-11,
  2**-25)``.
- ``int8``: levels in [-127, 127] at one float32 scale per tensor,
  ``<name>.scale`` = ``max|kept value| / 127`` (rounded up to a float32), with
  the int8 codec's stochastic rounding. Each kept value's error is below that
  scale (about ``max|x| / 127``), up to the float32 rounding of the decoded
  product (relative 2**-24), and its expected decoded value is x.

Error bound per element: a kept value has its value dtype's error, and a
dropped value is zeroed, so its error is at most the smallest kept
magnitude. The codec is biased, so pair it with error feedback at the site,
which carries the dropped values and the rounding error of the kept ones.

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
from medfed.contract.codecs.int8 import QUANT_MAX
from medfed.contract.codecs.params import (
    MAX_SEED,
    check_choice,
    check_integer,
    check_number,
    check_update_tensor,
    kept_count,
)
from medfed.contract.codecs.quantize import (
    check_levels,
    check_scales,
    dequantize,
    quantize_chunks,
)
from medfed.contract.codecs.sparse import (
    MAX_SPARSE_SIZE,
    VALUE_DTYPES,
    bitmap_length,
    check_indices,
    encode_values,
    pack_bitmap,
    scatter,
    unpack_bitmap,
)
from medfed.errors import EnvelopeError

__all__ = ["INDEX_ENCODINGS", "TOPK_VALUE_DTYPES", "TopKCodec"]

INDEX_ENCODINGS = ("int32", "bitmap")
TOPK_VALUE_DTYPES = (*VALUE_DTYPES, "int8")


@register_codec
class TopKCodec(Codec):
    """Keeps the ``fraction`` of each tensor's values with the largest magnitude."""

    name = "topk"
    linear = False
    dense = False

    def __init__(
        self,
        *,
        fraction: float,
        value_dtype: str = "float32",
        index_encoding: str = "int32",
        seed: int | None = None,
    ) -> None:
        """Validate the parameters.

        Args:
            fraction: share of each tensor's elements to keep, in (0, 1].
            value_dtype: "float32", "float16" or "int8" for the kept values.
            index_encoding: "int32" positions or a "bitmap" of kept elements.
            seed: seed of the int8 values' stochastic rounding, for
                reproducible tests. None draws fresh randomness from the
                operating system. It is not part of ``params`` because the
                decoder does not need it.
        """
        self.fraction = check_number(
            self.name, "fraction", fraction, above=0.0, at_most=1.0
        )
        self.value_dtype = check_choice(
            self.name, "value_dtype", value_dtype, TOPK_VALUE_DTYPES
        )
        self.index_encoding = check_choice(
            self.name, "index_encoding", index_encoding, INDEX_ENCODINGS
        )
        if seed is not None:
            check_integer(self.name, "seed", seed, minimum=0, maximum=MAX_SEED)
        self._rng = np.random.default_rng(seed)

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "fraction": self.fraction,
            "value_dtype": self.value_dtype,
        }
        # The default int32 form keeps the header it had before bitmaps.
        if self.index_encoding != "int32":
            params["index_encoding"] = self.index_encoding
        return params

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the positions and the values of each tensor's kept elements.

        The positions are ``<name>.indices`` (sorted int32) or
        ``<name>.bitmap``. The values are ``<name>.values``, plus
        ``<name>.scale`` for int8 values.
        """
        arrays: dict[str, np.ndarray] = {}
        for key, value in update.items():
            flat = check_update_tensor(self.name, key, value).reshape(-1)
            if self.index_encoding == "int32" and flat.size > MAX_SPARSE_SIZE:
                raise EnvelopeError(
                    f"codec 'topk' cannot encode tensor {key!r}: its {flat.size} "
                    f"elements exceed the int32 index range; set index_encoding "
                    f"to bitmap"
                )
            indices = self._largest_positions(flat)
            if self.index_encoding == "int32":
                arrays[f"{key}.indices"] = indices.astype(np.int32)
            else:
                arrays[f"{key}.bitmap"] = pack_bitmap(indices, flat.size)
            arrays.update(self._encode_kept_values(key, flat[indices]))
        return arrays

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        require_keys(
            payload,
            (name + suffix for name, _, _ in specs for suffix in self._suffixes()),
        )
        tensors = {}
        for name, shape, _ in specs:
            size = math.prod(shape)
            kept = kept_count(self.fraction, size)
            values = self._decode_kept_values(payload, name, kept)
            if self.index_encoding == "int32":
                positions = require_array(payload, f"{name}.indices", (kept,), "int32")
                check_indices(f"{name}.indices", positions, size)
            else:
                bitmap = require_array(
                    payload, f"{name}.bitmap", (bitmap_length(size),), "uint8"
                )
                positions = unpack_bitmap(f"{name}.bitmap", bitmap, size, kept)
            tensors[name] = scatter(size, positions, values, shape)
        return tensors

    def _suffixes(self) -> tuple[str, ...]:
        position_suffix = ".indices" if self.index_encoding == "int32" else ".bitmap"
        if self.value_dtype == "int8":
            return (position_suffix, ".values", ".scale")
        return (position_suffix, ".values")

    def _largest_positions(self, flat: np.ndarray) -> np.ndarray:
        """Return the sorted positions of the kept largest-magnitude elements."""
        kept = kept_count(self.fraction, flat.size)
        if kept == flat.size:
            return np.arange(flat.size)
        indices = np.argpartition(np.abs(flat), flat.size - kept)[-kept:]
        indices.sort()
        return indices

    def _encode_kept_values(
        self, key: str, values: np.ndarray
    ) -> dict[str, np.ndarray]:
        if self.value_dtype != "int8":
            return {
                f"{key}.values": encode_values(self.name, key, values, self.value_dtype)
            }
        levels, scales = quantize_chunks(values, 0, QUANT_MAX, self._rng)
        return {f"{key}.values": levels.astype(np.int8), f"{key}.scale": scales}

    def _decode_kept_values(
        self, payload: Mapping[str, np.ndarray], name: str, kept: int
    ) -> np.ndarray:
        values = require_array(payload, f"{name}.values", (kept,), self.value_dtype)
        if self.value_dtype != "int8":
            return values
        check_levels(f"{name}.values", values, QUANT_MAX)
        scales = require_array(payload, f"{name}.scale", (1,), "float32")
        check_scales(f"{name}.scale", scales)
        return dequantize(values, scales, 0)
