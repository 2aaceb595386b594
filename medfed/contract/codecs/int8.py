"""8-bit codec with stochastic rounding.

Each value x becomes an integer q in [-127, 127] with ``x ~ q * scale``.
Rounding is stochastic: ``q = floor(x / scale + u)`` with u uniform on [0, 1),
so ``E[q * scale] = x`` (unbiased) and ``|q * scale - x| < scale`` per element,
up to the float32 rounding of the decoded product (relative 2**-24).

Three ways to choose ``scale``:

- data-dependent (``chunk_size``): each tensor, or each run of ``chunk_size``
  elements of the flattened tensor, gets ``scale = max|x| / 127``, sent as a
  float32 array beside the integers. No value is clipped, but every site
  chooses its own scales, so integers from different sites cannot be summed.
- coarse data-dependent (``step_rms``, with or without ``chunk_size``):
  ``scale = max(step_rms * rms, max|x| / 127)`` per tensor or chunk, rms being
  its root mean square. The wire form is the same, because only the encoder
  picks the coarser step. With ``step_rms`` 1, Gaussian values (such as a DP-noised
  update) take about 9 distinct levels, whose entropy is about 2.2 bits, so
  the envelope's zstd (``compression.zstd``, best at ``zstd_level`` 19) sends
  about 2.3 bits per value: about 12x fewer payload bytes than fp32, at an
  added rounding variance of at most ``scale**2 / 4`` and about
  ``scale**2 / 6`` on average, 17% of a Gaussian's variance.
- shared (``scale``): one scale fixed in the study config for every site and
  round. Values are clipped to ``[-127 * scale, 127 * scale]`` first, which
  biases any value beyond that range. With DP clipping at norm C, a scale of
  C / 127 never clips. Because every site uses the same scale, the sum of the
  sites' integers times ``scale`` is the sum of their decoded updates, so the
  integers can be added in a masking ring (``linear`` is True). Under masking
  the ring encoder ``medfed.contract.secagg.int8_ring`` does this
  quantization, and this codec's ``encode`` is not called.
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
    check_number,
    check_update_tensor,
)
from medfed.contract.codecs.quantize import (
    check_scales,
    chunk_count,
    dequantize,
    quantize_chunks,
    stochastic_levels,
)
from medfed.errors import ConfigError, EnvelopeError

__all__ = ["QUANT_MAX", "Int8Codec"]

#: Largest integer magnitude sent. -128 is never produced, so the range is
#: symmetric and a decoder rejects it.
QUANT_MAX = 127
_MAX_CHUNK_SIZE = 2**31 - 1
_MAX_SCALE = float(np.finfo(np.float32).max) / QUANT_MAX


@register_codec
class Int8Codec(Codec):
    """Quantizes each value to int8 with a per-tensor, per-chunk or shared scale."""

    name = "int8"
    linear = False

    def __init__(
        self,
        *,
        chunk_size: int = 0,
        scale: float | None = None,
        step_rms: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Validate the parameters.

        Args:
            chunk_size: elements that share one scale, counted along the
                flattened tensor, or 0 for one scale per tensor. It must stay
                0 with ``scale``.
            scale: a positive scale shared by every site. When set, the codec
                sends no scales and its decoding is linear across sites.
            step_rms: None for the scale ``max|x| / 127``, or a positive
                step in units of each tensor's or chunk's root mean square
                (at most 127), for ``max(step_rms * rms, max|x| / 127)``. It
                cannot be combined with ``scale``.
            seed: seed of the stochastic rounding, for reproducible tests.
                None draws fresh randomness from the operating system. It is
                not part of ``params`` because the decoder does not need it.
        """
        self.chunk_size = check_integer(
            self.name, "chunk_size", chunk_size, minimum=0, maximum=_MAX_CHUNK_SIZE
        )
        self.scale: float | None = None
        if scale is not None:
            self.scale = check_number(
                self.name, "scale", scale, above=0.0, at_most=_MAX_SCALE
            )
            if np.float32(self.scale) == 0:
                raise ConfigError(
                    f"codec 'int8' parameter scale must be representable as a "
                    f"positive float32 (at least 1.4e-45), got {scale!r}"
                )
            if self.chunk_size:
                raise ConfigError(
                    "codec 'int8' parameters chunk_size and scale exclude each "
                    f"other: set chunk_size to 0 with a shared scale, got "
                    f"chunk_size {chunk_size!r}"
                )
            self.linear = True
        self.step_rms = 0.0
        if step_rms is not None:
            self.step_rms = check_number(
                self.name, "step_rms", step_rms, above=0.0, at_most=float(QUANT_MAX)
            )
            if self.scale is not None:
                raise ConfigError(
                    "codec 'int8' parameters step_rms and scale exclude each "
                    "other: step_rms picks each site's scale from its data, "
                    "scale fixes one for all sites; remove one of them"
                )
        if seed is not None:
            check_integer(self.name, "seed", seed, minimum=0, maximum=MAX_SEED)
        self._rng = np.random.default_rng(seed)

    @property
    def params(self) -> dict[str, Any]:
        if self.scale is not None:
            return {"scale": self.scale}
        if self.step_rms:
            return {"chunk_size": self.chunk_size, "step_rms": self.step_rms}
        return {"chunk_size": self.chunk_size}

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return ``<name>.q`` (int8, the tensor's shape) for each tensor.

        Without a shared scale, also return ``<name>.scale`` (float32, one
        element per chunk).
        """
        arrays: dict[str, np.ndarray] = {}
        for key, value in update.items():
            flat = check_update_tensor(self.name, key, value).reshape(-1)
            if self.scale is not None:
                scale = np.float64(np.float32(self.scale))
                steps = np.clip(flat / scale, -QUANT_MAX, QUANT_MAX)
                levels = stochastic_levels(steps, self._rng, QUANT_MAX)
            else:
                levels, scales = quantize_chunks(
                    flat, self.chunk_size, QUANT_MAX, self._rng, self.step_rms
                )
                arrays[f"{key}.scale"] = scales
            arrays[f"{key}.q"] = levels.astype(np.int8).reshape(np.shape(value))
        return arrays

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        suffixes = (".q",) if self.scale is not None else (".q", ".scale")
        require_keys(
            payload, (name + suffix for name, _, _ in specs for suffix in suffixes)
        )
        tensors = {}
        for name, shape, _ in specs:
            quantized = require_array(payload, f"{name}.q", shape, "int8")
            if quantized.size and int(quantized.min()) < -QUANT_MAX:
                raise EnvelopeError(
                    f"payload array {name + '.q'!r} contains -128, but int8 "
                    f"values must lie in [-{QUANT_MAX}, {QUANT_MAX}]"
                )
            size = math.prod(shape)
            if self.scale is not None:
                scales = np.full(1, self.scale, dtype=np.float32)
            else:
                scales = require_array(
                    payload,
                    f"{name}.scale",
                    (chunk_count(size, self.chunk_size),),
                    "float32",
                )
                check_scales(f"{name}.scale", scales)
            chunk_size = 0 if self.scale is not None else self.chunk_size
            tensors[name] = dequantize(quantized, scales, chunk_size).reshape(shape)
        return tensors
