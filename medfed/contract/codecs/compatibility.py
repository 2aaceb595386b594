"""Compatibility rules between codecs and secure aggregation modes.

Masking (pairwise masks that cancel in the sum) clips each site's update,
weights it by the sample count, encodes it as integers and adds masks in
the ring Z_{2^32} or Z_{2^64}. A masked value is uniform over the whole ring,
so it takes 32 or 64 bits on the wire whatever codec produced it. Hence:

- ``fp32``: accepted. It means no compression, and the masking layer does
  the fixed-point encoding itself.
- ``int8`` with a shared ``scale``: accepted. Every site rounds its clipped
  update to int8 levels at the one scale of the study, and its levels times
  its sample count go into the ring (``medfed.contract.secagg.int8_ring``),
  so the masked sum decodes to the weighted sum of the quantized updates
  (``Int8Codec.linear`` is True). The weighted sum needs about
  8 + log2(total samples) bits, so the ring stays 32 bits wide: int8 under
  masking changes the precision of the update, not its size.
- ``int8`` with per-tensor or per-chunk scales: rejected, because each site
  picks its scales from its own data, and integers at different scales
  cannot be summed. Setting ``scale`` fixes that.
- ``lowbit`` (8, 4 or 2 bits): rejected. Each site picks its scales from
  its own data, so the sites' levels cannot be summed, and a 4- or 2-bit
  level would still fill a 32-bit ring word, so a shared-scale variant would
  add rounding error and save no bytes. int8 with a shared scale is the
  quantized choice under masking.
- ``fp16``: rejected. Float16 bit patterns cannot be summed in a ring, and
  the masking layer would widen the values back to ring words.
- ``topk``, ``randk``, whatever their index encoding and value dtype:
  rejected. A mask is non-zero on every coordinate, so a masked sparse
  update is as large as a dense one. The sites' kept positions also differ,
  so the sum of their sparse supports is wrong.

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


def _check_masking(codec_name: str, dense: bool, linear: bool) -> None:
    if codec_name == "fp32" or (codec_name == "int8" and linear):
        return
    if codec_name == "int8":
        raise ConfigError(
            "codec 'int8' with per-tensor or per-chunk scales does not compose "
            "with secure_aggregation 'masking': each site picks those scales "
            "from its own data, so the sites' integers cannot be summed; set "
            "the shared scale instead (params: {scale: clip / 127}) or choose "
            "codec fp32"
        )
    if codec_name == "lowbit":
        raise ConfigError(
            "codec 'lowbit' does not compose with secure_aggregation 'masking': "
            "each site picks its scales from its own data, so the sites' levels "
            "cannot be summed, and masked values fill the 32-bit ring whatever "
            "their width, so 4- or 2-bit levels would save no bytes; choose int8 "
            "with a shared scale (params: {scale: clip / 127}) for quantized "
            "updates under masking, or codec fp32"
        )
    if not dense:
        reason = (
            "a mask is non-zero on every coordinate, so a masked sparse update "
            "is as large as a dense one, and the sites' kept positions differ, "
            "so the sum of their sparse supports is wrong"
        )
    else:
        reason = (
            "its payload cannot be summed in the masking ring, and masked "
            "values fill the 32-bit ring whatever the codec, so it would only "
            "add rounding error"
        )
    raise ConfigError(
        f"codec {codec_name!r} does not compose with secure_aggregation "
        f"'masking': {reason}; choose codec fp32, or int8 with a shared scale"
    )


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
