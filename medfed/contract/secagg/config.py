"""The ``secure_aggregation`` section of a study config.

A study picks ``mode: none``, ``masking`` or ``ckks``. The config loader
calls ``check`` with the study's number of sites and codec, so a threshold
that is too low or an encoding that could wrap around is rejected before any
round starts.

Under masking the study's codec picks the ring encoding: ``fp32`` uses fixed
point with ``fractional_bits``, and ``int8`` with a shared ``scale`` puts
int8 levels at that scale into the ring (``int8_ring``).
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medfed.contract.codecs.base import Codec
from medfed.contract.secagg.ckks import CkksParameters, check_ckks_capacity
from medfed.contract.secagg.int8_ring import Int8RingEncoding
from medfed.contract.secagg.messages import check_threshold
from medfed.contract.secagg.ring import FixedPointEncoding, RingEncoding
from medfed.errors import ConfigError

__all__ = ["DEFAULT_KEY_EXCHANGE_SECONDS", "SecureAggregationConfig"]

#: Seconds each key-exchange phase of a masking round may take when the
#: config sets none. Sites exchange keys while they train, and healthy sites
#: finish within seconds over loopback. Deployed sites may first wait for a
#: worker to start their container.
#: NOTE: a guess, not measured on deployed sites. A site whose round starts
#: later than this after the round opened is left out of that round.
DEFAULT_KEY_EXCHANGE_SECONDS = 300.0


class SecureAggregationConfig(BaseModel):
    """Secure-aggregation settings of a study.

    Attributes:
        mode: ``none`` sends plain updates; ``masking`` and ``ckks`` hide
            each site's update from the aggregation service.
        threshold: the Shamir threshold for masking; None means
            ``site_count // 2 + 1``.
        clip: every update coordinate is clipped to ``[-clip, clip]``.
        max_weight: the largest sample count a site may weight its update by.
        fractional_bits: the masking fixed-point scale ``2^fractional_bits``;
            unused with int8, whose scale is the codec's.
        ring_bits: the masking ring Z_{2^ring_bits}, 32 or 64.
        rounding: ``nearest`` or ``stochastic`` rounding in the ring
            encoding; None means ``nearest`` for fixed point and
            ``stochastic`` for int8, the int8 codec's own rounding.
        poly_modulus_degree: the CKKS ring degree.
        coeff_mod_bit_sizes: the CKKS coefficient moduli, in bits.
        scale_bits: the CKKS encoding scale ``2^scale_bits``.
        key_exchange_seconds: the seconds each masking key-exchange phase
            may take: the service closes advertising this long after the
            round opens and sharing this long after advertising closed,
            with the sites that have sent their message. None means
            ``DEFAULT_KEY_EXCHANGE_SECONDS`` or the round's deadline,
            whichever is shorter. Uploads keep the round's deadline.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["none", "masking", "ckks"] = "none"
    threshold: int | None = Field(default=None, ge=2)
    clip: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    max_weight: int = Field(default=100_000, ge=1)
    fractional_bits: int = Field(default=10, ge=0, le=52)
    ring_bits: Literal[32, 64] = 32
    rounding: Literal["nearest", "stochastic"] | None = None
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    scale_bits: int = 30
    key_exchange_seconds: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    def resolved_threshold(self, site_count: int) -> int:
        """Return the configured threshold, or ``site_count // 2 + 1``."""
        return self.threshold if self.threshold is not None else site_count // 2 + 1

    def resolved_key_exchange_seconds(self, deadline_seconds: float) -> float:
        """Return the seconds each key-exchange phase may take in a round.

        This is ``key_exchange_seconds``, or ``DEFAULT_KEY_EXCHANGE_SECONDS``
        when unset, and never more than the round's ``deadline_seconds``.
        """
        seconds = self.key_exchange_seconds or DEFAULT_KEY_EXCHANGE_SECONDS
        return min(seconds, deadline_seconds)

    def check_key_exchange_deadline(self, deadline_seconds: float) -> None:
        """Check ``key_exchange_seconds`` against the round's deadline.

        Raises:
            ConfigError: ``key_exchange_seconds`` is set above
                ``deadline_seconds``.
        """
        if self.key_exchange_seconds is None:
            return
        if self.key_exchange_seconds > deadline_seconds:
            raise ConfigError(
                f"secure_aggregation.key_exchange_seconds is "
                f"{self.key_exchange_seconds:g} s, above the round deadline of "
                f"{deadline_seconds:g} s (round.deadline_seconds); set it to at "
                f"most {deadline_seconds:g} or raise round.deadline_seconds"
            )

    def encoding(self, site_count: int, codec: Codec | None = None) -> RingEncoding:
        """Return the masking encoding for a round of ``site_count`` sites.

        Args:
            site_count: the number of sites in the round.
            codec: the study's codec; None or ``fp32`` selects fixed point,
                ``int8`` with a shared scale selects int8 levels.

        Raises:
            ConfigError: the sum of ``site_count`` updates could wrap around,
                or the codec has no ring encoding.
        """
        if codec is None or codec.name == "fp32":
            return FixedPointEncoding(
                fractional_bits=self.fractional_bits,
                clip=self.clip,
                max_weight=self.max_weight,
                site_count=site_count,
                ring_bits=self.ring_bits,
                rounding=self.rounding or "nearest",
            )
        scale = getattr(codec, "scale", None)
        if codec.name == "int8" and isinstance(scale, float):
            return Int8RingEncoding(
                scale=scale,
                clip=self.clip,
                max_weight=self.max_weight,
                site_count=site_count,
                ring_bits=self.ring_bits,
                rounding=self.rounding or "stochastic",
            )
        raise ConfigError(
            f"codec {codec.name!r} with {codec.params} has no masking ring "
            "encoding; choose codec fp32, or int8 with a shared scale"
        )

    def ckks_parameters(self) -> CkksParameters:
        return CkksParameters(
            poly_modulus_degree=self.poly_modulus_degree,
            coeff_mod_bit_sizes=self.coeff_mod_bit_sizes,
            scale_bits=self.scale_bits,
        )

    def check(self, site_count: int, codec: Codec | None = None) -> None:
        """Check the section for a study of ``site_count`` sites and ``codec``.

        Raises:
            ConfigError: the message names the ``secure_aggregation`` key and
                the limit it breaks.
        """
        try:
            if self.mode == "masking":
                check_threshold(self.resolved_threshold(site_count), site_count)
                self.encoding(site_count, codec)
            elif self.mode == "ckks":
                check_ckks_capacity(
                    parameters=self.ckks_parameters(),
                    clip=self.clip,
                    max_weight=self.max_weight,
                    site_count=site_count,
                )
        except ConfigError as error:
            raise ConfigError(
                f"secure_aggregation (mode {self.mode!r}): {error}"
            ) from None
