"""The ``compression`` section of a study config.

Example (YAML)::

    compression:
      codec: topk
      params: {fraction: 0.01, value_dtype: float16}
      zstd: true
      zstd_level: 19
      error_feedback: true

The codec and its parameters are validated when the section is loaded, and
``check`` rejects a codec that does not compose with the study's secure
aggregation mode, so a bad combination fails before any round starts.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfed.contract.codecs.base import CODECS, Codec, get_codec
from medfed.contract.codecs.compatibility import check_codec_compatibility
from medfed.errors import ConfigError

__all__ = ["CompressionConfig"]

DEFAULT_ZSTD_LEVEL = 3


class CompressionConfig(BaseModel):
    """Compression settings of a study, applied by every site to its update.

    Attributes:
        codec: a registered codec name (fp32, fp16, int8, lowbit, topk,
            randk).
        params: the codec's parameters; see each codec's docstring.
        zstd: compress the envelope payload with zstd as well. Only
            without secure aggregation, which ``check`` enforces.
        zstd_level: zstd's compression level, 1 to 22 (default 3). Levels
            15 and above entropy-code small-alphabet payloads such as
            ``int8`` with ``step_rms`` close to their entropy, where level 3
            sends about 0.6 bits per value more. Level 19 took 0.3 s per
            million values on a 2-core machine. The decoder does not depend on it.
        error_feedback: carry each lossy codec's error into the next round
            at the site. Ignored for fp32, which loses nothing, and under
            masking secure aggregation, whose ring encoder does the int8
            rounding without keeping a residual.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    codec: str = "fp32"
    params: dict[str, int | float | str | bool] = Field(default_factory=dict)
    # Strict, so that a quoted "yes", a 1 or a level of true is an error
    # instead of a silent conversion.
    zstd: bool = Field(default=False, strict=True)
    zstd_level: int | None = Field(default=None, ge=1, le=22, strict=True)
    error_feedback: bool = Field(default=True, strict=True)

    @model_validator(mode="after")
    def _check_codec(self) -> "CompressionConfig":
        # ConfigError is a ValueError, so pydantic reports it under this
        # section with the codec's own message.
        if self.codec not in selectable_codecs():
            mode = _SECURE_MODE_CODECS.get(self.codec)
            reason = (
                f"codec {self.codec!r} is what secure_aggregation: {mode} sends, "
                "so set that mode instead"
                if mode
                else f"unknown codec {self.codec!r}"
            )
            raise ConfigError(
                f"{reason}; choose one of {', '.join(selectable_codecs())}"
            )
        self.build_codec()
        if self.zstd_level is not None and not self.zstd:
            raise ConfigError(
                f"zstd_level {self.zstd_level} is set but zstd is false: set "
                "zstd: true to compress the payload, or remove zstd_level"
            )
        return self

    @property
    def envelope_compression(self) -> Literal["none", "zstd"]:
        """The ``compression`` argument of ``encode_envelope``."""
        return "zstd" if self.zstd else "none"

    @property
    def envelope_zstd_level(self) -> int:
        """The ``zstd_level`` argument of ``encode_envelope``."""
        return self.zstd_level or DEFAULT_ZSTD_LEVEL

    def build_codec(self) -> Codec:
        """Return a new codec instance for one site's encoding."""
        return get_codec(self.codec, self.params)

    def check(self, secure_aggregation: str) -> None:
        """Check the codec and zstd against the study's secure aggregation mode.

        Raises:
            ConfigError: the message names the ``compression`` section, the
                reason and the codec to choose instead.
        """
        try:
            check_codec_compatibility(self.codec, secure_aggregation, self.params)
        except ConfigError as error:
            raise ConfigError(f"compression (codec {self.codec!r}): {error}") from None
        if self.zstd and secure_aggregation != "none":
            # The masking and CKKS uploads are built without the envelope's
            # zstd. A masked value is uniform over the ring, so zstd could
            # not shrink it anyway.
            raise ConfigError(
                f"compression.zstd is true, but secure_aggregation "
                f"{secure_aggregation!r} sends its uploads without zstd; remove "
                "zstd and zstd_level from the compression section"
            )


#: Codecs that a secure aggregation mode writes into envelopes, with that mode.
_SECURE_MODE_CODECS = {"masked": "masking", "ckks": "ckks"}


def selectable_codecs() -> list[str]:
    """Return the codec names a study's ``compression.codec`` may name, sorted."""
    # Importing the package registers the built-in codecs.
    import medfed.contract.codecs  # noqa: F401

    return sorted(set(CODECS) - set(_SECURE_MODE_CODECS))
