"""Compatibility rules between codecs and secure aggregation modes.

Masking (pairwise masks that cancel in the sum) adds every site's payload in
an integer ring, so it accepts a codec only when its payload is dense and its
decoding is linear with parameters shared by all sites:

- ``fp32``: accepted. The masking layer encodes the float values in fixed
  point itself; fp32 is the uncompressed baseline.
- ``int8`` with a shared ``scale``: accepted. The sum of the sites' integers
  times the scale is the sum of their updates, so the ring adds the 8-bit
  integers directly (in a word wide enough for the number of sites).
- ``int8`` with per-tensor or per-chunk scales: rejected, because each site
  picks its scales from its own data, and integers at different scales do
  not add up to anything.
- ``fp16``: rejected. Float16 bit patterns do not add in a ring, so masking
  would widen them back to its fixed-point words: the rounding error stays
  and no byte is saved.
- ``topk``, ``randk``: rejected. A mask is non-zero on every coordinate, so
  a masked sparse update is dense and saves nothing, and the sites' kept
  positions differ, so the masks cannot cancel on the positions each sent.

CKKS encrypts a dense vector of floats, and the ciphertext size depends on
the encryption parameters (polynomial degree, modulus chain), not on the
precision of the plaintext. It therefore accepts only ``fp32``: quantizing
codecs add error and save nothing, and sparse codecs cannot be added slot by
slot when the sites' positions differ.
"""

from collections.abc import Mapping
from typing import Any

from medfed.contract.codecs.base import get_codec
from medfed.errors import ConfigError

__all__ = ["SECURE_AGGREGATION_MODES", "check_codec_compatibility"]

SECURE_AGGREGATION_MODES = ("none", "masking", "ckks")


def check_codec_compatibility(
    codec_name: str,
    secure_aggregation: str,
    params: Mapping[str, Any] | None = None,
) -> None:
    """Raise ConfigError unless the codec composes with ``secure_aggregation``.

    Args:
        codec_name: a registered codec name.
        secure_aggregation: "none", "masking" or "ckks".
        params: the codec's parameters, validated here as well, because
            int8's compatibility with masking depends on them.

    Raises:
        ConfigError: the codec or its parameters are invalid, the mode is
            unknown, or the pair does not compose. The message gives the
            reason and what to choose instead.
    """
    if secure_aggregation not in SECURE_AGGREGATION_MODES:
        raise ConfigError(
            f"unknown secure_aggregation {secure_aggregation!r}: choose one of "
            f"{', '.join(SECURE_AGGREGATION_MODES)}"
        )
    codec = get_codec(codec_name, params)
    if secure_aggregation == "masking":
        _check_masking(codec_name, codec.dense, codec.linear)
    elif secure_aggregation == "ckks":
        _check_ckks(codec_name, codec.dense)


def _check_ckks(codec_name: str, dense: bool) -> None:
    if codec_name == "fp32":
        return
    if not dense:
        reason = (
            "CKKS adds encrypted vectors slot by slot, and the sites' kept "
            "positions differ, so their sparse values cannot be added"
        )
    else:
        reason = (
            "CKKS encrypts float vectors and its ciphertext size does not "
            "depend on the plaintext's precision, so quantizing adds error "
            "and saves nothing"
        )
    raise ConfigError(
        f"codec {codec_name!r} does not compose with secure_aggregation "
        f"'ckks': {reason}; choose codec fp32"
    )


def _check_masking(codec_name: str, dense: bool, linear: bool) -> None:
    if not dense:
        raise ConfigError(
            f"codec {codec_name!r} does not compose with secure_aggregation "
            "'masking': a mask is non-zero on every coordinate, so a masked "
            "sparse update is as large as a dense one, and the sites' kept "
            "positions differ, so the sum of their sparse supports is wrong; "
            "choose codec int8 with a shared params.scale, or fp32"
        )
    if codec_name == "int8" and not linear:
        raise ConfigError(
            "codec 'int8' composes with secure_aggregation 'masking' only with "
            "a scale shared by every site: per-tensor or per-chunk scales come "
            "from each site's data, so the sites' integers cannot be summed; "
            "set params.scale (for example the DP clipping norm / 127) and "
            "leave chunk_size at 0"
        )
    if not linear:
        raise ConfigError(
            f"codec {codec_name!r} does not compose with secure_aggregation "
            "'masking': its payload cannot be summed in the masking ring, so "
            "it would be widened to fixed point and save nothing; choose codec "
            "int8 with a shared params.scale, or fp32"
        )
