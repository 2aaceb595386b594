"""Fixed-point encoding of site updates into the ring Z_{2^k}.

Masking works on integers modulo ``2^ring_bits`` (32 by default, 64 allowed),
where unsigned numpy arithmetic wraps for free. A site's float update becomes
ring elements in three steps:

1. clip every coordinate to ``[-clip, clip]``;
2. multiply by the site's sample count, so the sum over sites is the
   numerator of the sample-weighted mean;
3. scale by ``2^fractional_bits`` and round to an integer, then reduce modulo
   ``2^ring_bits`` (two's complement).

The sum of the ring vectors of n sites decodes to the float sum exactly when
no partial sum leaves ``[-2^(ring_bits-1), 2^(ring_bits-1))``;
``check_ring_capacity`` rejects parameters for which that can fail.

Quantization bound, in weighted units (value times sample count), for each
coordinate of the decoded sum over n sites:

* ``nearest`` rounding: ``|error| <= n * 2^-(fractional_bits+1)``;
* ``stochastic`` rounding: ``|error| < n * 2^-fractional_bits``, and the
  error has zero mean.

Dividing by the total sample count turns this into the bound on the mean.
Clipping is not counted in these bounds: values beyond ``clip`` are changed
on purpose. Integer-valued inputs within the clip range encode exactly.

The ring encoding is a step of its own, separate from any codec: another
integer quantizer that uses one scale for the whole round can feed
``to_ring`` instead of ``encode_fixed_point``. Sites and the service use
any such encoding through ``RingEncoding``, and
``int8_ring.Int8RingEncoding`` is the second implementation.
"""

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from medfed.errors import ConfigError, SecureAggregationError

__all__ = [
    "DEFAULT_RING_BITS",
    "FixedPointEncoding",
    "RingEncoding",
    "check_encoding_input",
    "check_ring_capacity",
    "decode_fixed_point",
    "encode_fixed_point",
    "from_ring",
    "ring_dtype",
    "to_ring",
]

DEFAULT_RING_BITS = 32
_RING_DTYPES: dict[int, type[np.unsignedinteger]] = {32: np.uint32, 64: np.uint64}
# float64 represents every integer up to 2^53 exactly, so a scaled value above
# this would round before it reaches the integer ring.
_FLOAT64_EXACT_BITS = 53


def ring_dtype(ring_bits: int) -> np.dtype:
    """Return the unsigned numpy dtype that stores elements of Z_{2^ring_bits}.

    Raises:
        ConfigError: ``ring_bits`` is not 32 or 64.
    """
    if ring_bits not in _RING_DTYPES:
        raise ConfigError(f"ring_bits must be 32 or 64, got {ring_bits!r}")
    return np.dtype(_RING_DTYPES[ring_bits])


class RingEncoding(Protocol):
    """A round's rule for turning float updates into ring elements and back.

    The sum of ``site_count`` encoded updates, each weighted by at most
    ``max_weight``, never wraps around the ring, so ``decode`` of the signed
    sum returns the weighted sum of the quantized updates.
    """

    @property
    def ring_bits(self) -> int: ...

    @property
    def clip(self) -> float: ...

    @property
    def max_weight(self) -> int: ...

    @property
    def site_count(self) -> int: ...

    @property
    def rounding(self) -> Literal["nearest", "stochastic"]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def codec_params(self) -> dict[str, Any]:
        """The ``masked`` codec's parameters in an envelope of this encoding."""
        ...

    def encode(
        self,
        values: np.ndarray,
        *,
        weight: int,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Encode ``values`` weighted by ``weight`` as signed int64 integers."""
        ...

    def decode(self, integers: np.ndarray) -> np.ndarray:
        """Return the float64 weighted sum that signed ``integers`` encode."""
        ...


@dataclass(frozen=True, kw_only=True)
class FixedPointEncoding:
    """The round's rule for turning float updates into ring elements.

    Attributes:
        fractional_bits: the scale is ``2^fractional_bits``.
        clip: every coordinate is clipped to ``[-clip, clip]`` before weighting.
        max_weight: the largest sample count a site may fold into its vector.
        site_count: the number of sites in the round (the most that can be
            summed).
        ring_bits: 32 or 64.
        rounding: ``nearest`` (deterministic) or ``stochastic`` (unbiased).
    """

    fractional_bits: int
    clip: float
    max_weight: int
    site_count: int
    ring_bits: int = DEFAULT_RING_BITS
    rounding: Literal["nearest", "stochastic"] = "nearest"

    def __post_init__(self) -> None:
        if self.rounding not in ("nearest", "stochastic"):
            raise ConfigError(
                f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}"
            )
        check_ring_capacity(
            fractional_bits=self.fractional_bits,
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
        return {"ring_bits": self.ring_bits, "fractional_bits": self.fractional_bits}

    def encode(
        self,
        values: np.ndarray,
        *,
        weight: int,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Run ``encode_fixed_point`` with this encoding."""
        return encode_fixed_point(values, weight=weight, encoding=self, rng=rng)

    def decode(self, integers: np.ndarray) -> np.ndarray:
        return decode_fixed_point(integers, self)

    def error_bound(self, site_count: int) -> float:
        """Return the largest quantization error of one coordinate of a sum.

        Args:
            site_count: how many sites the sum covers.

        Returns:
            The bound in weighted units (value times sample count).
        """
        ulp = 2.0**-self.fractional_bits
        if self.rounding == "nearest":
            return site_count * ulp / 2
        return site_count * ulp


def check_ring_capacity(
    *,
    fractional_bits: int,
    clip: float,
    max_weight: int,
    site_count: int,
    ring_bits: int = DEFAULT_RING_BITS,
) -> None:
    """Check that a sum of encoded updates can never wrap around the ring.

    The largest magnitude one site can encode is
    ``clip * max_weight * 2^fractional_bits`` (plus one for rounding up), and
    the sum of ``site_count`` of them must stay below ``2^(ring_bits-1)``,
    because the decoder reads the upper half of the ring as negative.

    Raises:
        ConfigError: a parameter is out of range, or the named limit is
            exceeded. The message names the parameter to lower.
    """
    ring_dtype(ring_bits)
    if not isinstance(fractional_bits, int) or not 0 <= fractional_bits <= 52:
        raise ConfigError(
            f"fractional_bits must be an integer from 0 to 52, got {fractional_bits!r}"
        )
    if not isinstance(clip, int | float) or not math.isfinite(clip) or clip <= 0:
        raise ConfigError(f"clip must be a positive finite number, got {clip!r}")
    if not isinstance(max_weight, int) or max_weight < 1:
        raise ConfigError(
            f"max_weight must be a positive integer sample count, got {max_weight!r}"
        )
    if not isinstance(site_count, int) or site_count < 1:
        raise ConfigError(f"site_count must be a positive integer, got {site_count!r}")

    site_bound = math.ceil(clip * max_weight * 2.0**fractional_bits) + 1
    if site_bound > 2**_FLOAT64_EXACT_BITS:
        raise ConfigError(
            "one site's encoded value would exceed 2^53 and lose precision before "
            f"rounding: clip {clip} x max_weight {max_weight} x "
            f"2^fractional_bits (2^{fractional_bits}) = {site_bound}; lower "
            "fractional_bits, clip or max_weight"
        )
    half_ring = 2 ** (ring_bits - 1)
    if site_count * site_bound >= half_ring:
        largest = _largest_fractional_bits(clip, max_weight, site_count, half_ring)
        advice = (
            f"fractional_bits of at most {largest} fits"
            if largest is not None
            else "no fractional_bits fits, so lower clip, max_weight or site_count"
        )
        raise ConfigError(
            f"the masked sum can wrap around the 2^{ring_bits} ring: site_count "
            f"{site_count} x (clip {clip} x max_weight {max_weight} x "
            f"2^{fractional_bits} + 1) = {site_count * site_bound} reaches the "
            f"ring limit 2^{ring_bits - 1} = {half_ring}; {advice}"
        )


def _largest_fractional_bits(
    clip: float, max_weight: int, site_count: int, half_ring: int
) -> int | None:
    for bits in range(52, -1, -1):
        bound = math.ceil(clip * max_weight * 2.0**bits) + 1
        if bound <= 2**_FLOAT64_EXACT_BITS and site_count * bound < half_ring:
            return bits
    return None


def check_encoding_input(
    values: np.ndarray, *, weight: int, max_weight: int
) -> np.ndarray:
    """Return ``values`` as float64 after checking them and the weight.

    Raises:
        SecureAggregationError: the weight is not an integer from 1 to
            ``max_weight``, or a value is not finite.
    """
    if (
        not isinstance(weight, int | np.integer)
        or isinstance(weight, bool)
        or not 1 <= weight <= max_weight
    ):
        raise SecureAggregationError(
            f"sample-count weight must be an integer from 1 to max_weight "
            f"{max_weight}, got {weight!r}"
        )
    floats = np.asarray(values, dtype=np.float64)
    if not np.isfinite(floats).all():
        raise SecureAggregationError(
            "update contains NaN or infinite values and cannot be encoded"
        )
    return floats


def encode_fixed_point(
    values: np.ndarray,
    *,
    weight: int,
    encoding: FixedPointEncoding,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Clip, weight, scale and round ``values`` to signed integers.

    Args:
        values: a float vector, shape ``(length,)``.
        weight: the site's sample count, from 1 to ``encoding.max_weight``.
        encoding: the round's encoding.
        rng: the randomness for stochastic rounding; a fresh OS-seeded
            generator when None.

    Returns:
        An int64 vector of the same shape; pass it to ``to_ring``.

    Raises:
        SecureAggregationError: the weight is out of range or a value is not
            finite.
    """
    floats = check_encoding_input(values, weight=weight, max_weight=encoding.max_weight)
    scaled = np.clip(floats, -encoding.clip, encoding.clip) * (
        int(weight) * 2.0**encoding.fractional_bits
    )
    if encoding.rounding == "nearest":
        rounded = np.rint(scaled)
    else:
        generator = rng if rng is not None else np.random.default_rng()
        rounded = np.floor(scaled + generator.random(scaled.shape))
    return rounded.astype(np.int64)


def decode_fixed_point(
    integers: np.ndarray, encoding: FixedPointEncoding
) -> np.ndarray:
    """Return the float64 weighted sum that signed ``integers`` encode."""
    return np.asarray(integers, dtype=np.float64) / 2.0**encoding.fractional_bits


def to_ring(integers: np.ndarray, ring_bits: int = DEFAULT_RING_BITS) -> np.ndarray:
    """Reduce signed int64 ``integers`` modulo ``2^ring_bits`` (two's complement)."""
    dtype = ring_dtype(ring_bits)
    return np.asarray(integers, dtype=np.int64).astype(dtype)


def from_ring(elements: np.ndarray) -> np.ndarray:
    """Read ring elements as signed int64 in ``[-2^(k-1), 2^(k-1))``."""
    array = np.asarray(elements)
    if array.dtype == np.uint64:
        return array.view(np.int64)
    if array.dtype == np.uint32:
        return array.view(np.int32).astype(np.int64)
    raise SecureAggregationError(
        f"ring elements must be uint32 or uint64, got dtype {array.dtype}"
    )
