"""Int8 levels at a shared scale as the ring encoding of a masking round.

With ``compression: {codec: int8, params: {scale: s}}`` and masking, every
site quantizes its update with the study's one scale ``s`` and puts the
levels, times its sample count ``w``, into the ring Z_{2^ring_bits}:

1. clip every coordinate to ``[-clip, clip]``, where ``clip <= 127 * s``;
2. round ``x / s`` to a level ``q`` in [-127, 127]: ``floor(x / s + u)`` with
   u uniform on [0, 1) (``stochastic``, the int8 codec's rounding) or the
   nearest integer (``nearest``);
3. multiply ``q`` by ``w`` and reduce modulo ``2^ring_bits`` with ``to_ring``.

The signed sum over sites is ``sum_i w_i * q_i``, and ``s`` times it is the
sample-weighted sum of the sites' quantized updates. ``check_int8_ring_capacity``
requires ``site_count * 127 * max_weight < 2^(ring_bits - 1)``, so the sum
never wraps around.

Error bound for each coordinate of the decoded weighted sum, with
``W = sum_i w_i`` the sites' total sample count, in weighted units:

* ``stochastic``: ``|error| < s * W``, with zero mean and a standard
  deviation of at most ``s * sqrt(sum_i w_i^2) / 2``;
* ``nearest``: ``|error| <= s * W / 2``.

Divided by ``W``, the sample-weighted mean is off by less than ``s``
(``s / 2`` for nearest) whatever the number of sites, up to the float64
rounding of ``x / s`` and of the decoded product. Clipping is not counted:
values beyond ``clip`` are changed on purpose.

Size: a masked value is uniform over the whole ring, so an int8 update under
masking travels in as many bytes as a fixed-point one (4 per coordinate in a
32-bit ring). The sum itself needs only ``log2(site_count * 127 *
max_weight) + 1`` bits (19 for 4 sites of at most 300 samples), so a
narrower ring with bit packing could save bytes, but medfed's rings are 32
or 64 bits wide. Under masking, int8 therefore changes the precision of the
update and not its size.
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medfed.contract.codecs.int8 import QUANT_MAX
from medfed.contract.secagg.ring import (
    DEFAULT_RING_BITS,
    check_encoding_input,
    ring_dtype,
)
from medfed.errors import ConfigError

__all__ = ["Int8RingEncoding", "check_int8_ring_capacity"]

# A scale written as clip / 127 in a config can land a few float64 ulps
# short of it, so 127 * scale may fall below clip by this relative amount.
_CLIP_TOLERANCE = 1e-12


@dataclass(frozen=True, kw_only=True)
class Int8RingEncoding:
    """The round's rule for turning updates into weighted int8 levels.

    Attributes:
        scale: the shared int8 scale; level ``q`` stands for ``q * scale``.
        clip: every coordinate is clipped to ``[-clip, clip]`` before
            quantizing; at most ``127 * scale``.
        max_weight: the largest sample count a site may multiply its levels by.
        site_count: the number of sites in the round (the most that can be
            summed).
        ring_bits: 32 or 64.
        rounding: ``stochastic`` (unbiased) or ``nearest`` (deterministic).
    """

    scale: float
    clip: float
    max_weight: int
    site_count: int
    ring_bits: int = DEFAULT_RING_BITS
    rounding: Literal["nearest", "stochastic"] = "stochastic"

    def __post_init__(self) -> None:
        if self.rounding not in ("nearest", "stochastic"):
            raise ConfigError(
                f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}"
            )
        check_int8_ring_capacity(
            scale=self.scale,
            clip=self.clip,
            max_weight=self.max_weight,
            site_count=self.site_count,
            ring_bits=self.ring_bits,
        )

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.ring_bits)

    @property
    def codec_params(self) -> dict[str, Any]:
        return {"ring_bits": self.ring_bits, "int8_scale": self.scale}

    def quantize(
        self, values: np.ndarray, *, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """Clip ``values`` and round them to int8 levels, returned as int64."""
        floats = np.asarray(values, dtype=np.float64)
        steps = np.clip(floats, -self.clip, self.clip) / self.scale
        if self.rounding == "nearest":
            levels = np.rint(steps)
        else:
            generator = rng if rng is not None else np.random.default_rng()
            levels = np.floor(steps + generator.random(steps.shape))
        # clip <= 127 * scale up to _CLIP_TOLERANCE, and steps + u can round
        # up to the next integer in float64, so a level can land on +-128.
        np.clip(levels, -QUANT_MAX, QUANT_MAX, out=levels)
        return levels.astype(np.int64)

    def encode(
        self,
        values: np.ndarray,
        *,
        weight: int,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Quantize ``values`` to int8 levels and multiply them by ``weight``.

        Args:
            values: a float vector, shape ``(length,)``.
            weight: the site's sample count, from 1 to ``max_weight``.
            rng: the randomness for stochastic rounding; a fresh OS-seeded
                generator when None.

        Returns:
            An int64 vector of the same shape; pass it to ``to_ring``.

        Raises:
            SecureAggregationError: the weight is out of range or a value is
                not finite.
        """
        floats = check_encoding_input(values, weight=weight, max_weight=self.max_weight)
        return self.quantize(floats, rng=rng) * int(weight)

    def decode(self, integers: np.ndarray) -> np.ndarray:
        return np.asarray(integers, dtype=np.float64) * self.scale

    def error_bound(self, total_weight: int) -> float:
        """Return the largest quantization error of one coordinate of a sum.

        Args:
            total_weight: the total sample count of the sites in the sum.

        Returns:
            The bound in weighted units (value times sample count).
        """
        if self.rounding == "nearest":
            return self.scale * total_weight / 2
        return self.scale * total_weight


def check_int8_ring_capacity(
    *,
    scale: float,
    clip: float,
    max_weight: int,
    site_count: int,
    ring_bits: int = DEFAULT_RING_BITS,
) -> None:
    """Check that int8 levels fit the clip and that their sum cannot wrap.

    One site contributes at most ``127 * max_weight`` in magnitude, and the
    sum of ``site_count`` of them must stay below ``2^(ring_bits-1)``,
    because the decoder reads the upper half of the ring as negative.

    Raises:
        ConfigError: a parameter is out of range, ``clip`` exceeds
            ``127 * scale``, or the sum could wrap. The message names the
            parameter to change.
    """
    ring_dtype(ring_bits)
    for name, value in (("scale", scale), ("clip", clip)):
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    if not isinstance(max_weight, int) or max_weight < 1:
        raise ConfigError(
            f"max_weight must be a positive integer sample count, got {max_weight!r}"
        )
    if not isinstance(site_count, int) or site_count < 1:
        raise ConfigError(f"site_count must be a positive integer, got {site_count!r}")

    level_range = QUANT_MAX * scale
    if clip > level_range * (1 + _CLIP_TOLERANCE):
        raise ConfigError(
            f"clip {clip} exceeds the int8 range 127 x scale {scale} = "
            f"{level_range}, so values between them would be clipped twice; "
            f"set the int8 scale to clip / 127 = {clip / QUANT_MAX} or lower "
            f"clip to {level_range}"
        )
    half_ring = 2 ** (ring_bits - 1)
    total = site_count * QUANT_MAX * max_weight
    if total >= half_ring:
        largest = (half_ring - 1) // (site_count * QUANT_MAX)
        advice = (
            f"lower max_weight to at most {largest}"
            if largest >= 1
            else "lower site_count"
        )
        if ring_bits == 32:
            advice += ", or set ring_bits to 64"
        raise ConfigError(
            f"the masked sum can wrap around the 2^{ring_bits} ring: site_count "
            f"{site_count} x 127 x max_weight {max_weight} = {total} reaches the "
            f"ring limit 2^{ring_bits - 1} = {half_ring}; {advice}"
        )
