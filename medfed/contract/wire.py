"""The update envelope: the one wire format for every site upload.

Layout, all integers big-endian::

    b"MFED" | version: u8 | header length: u32 | header (UTF-8 JSON) | payload

The header describes the payload completely (study, round, site, codec and its
parameters, the decoded tensors' names, shapes and dtypes, sample count, payload
length and SHA-256, optional signature). The payload is a safetensors file of
the codec's arrays, optionally zstd-compressed. Nothing is unpickled.

``decode_envelope`` checks every declared size against ``EnvelopeLimits``
before it allocates, and rejects any mismatch between header and payload with
an ``EnvelopeError`` that names the field.
"""

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.contract.codecs import Encoder, TensorSpec, get_codec
from medfed.contract.ids import IDENTIFIER_PATTERN
from medfed.errors import ConfigError, EnvelopeError

__all__ = [
    "FORMAT_VERSION",
    "DecodedUpdate",
    "EnvelopeHeader",
    "EnvelopeLimits",
    "TensorInfo",
    "decode_envelope",
    "encode_envelope",
    "read_header",
]

MAGIC = b"MFED"
FORMAT_VERSION: Final = 1
_PREFIX = struct.Struct(">4sBI")


class TensorInfo(BaseModel):
    """A decoded tensor's name, shape and dtype."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    shape: list[int] = Field(max_length=8)
    dtype: Literal["float32"] = "float32"

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, shape: list[int]) -> list[int]:
        if any(size < 0 for size in shape):
            raise ValueError(f"shape {shape} has a negative size")
        return shape


class CodecInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$")
    params: dict[str, int | float | str | bool] = Field(default_factory=dict)


class SignatureInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(min_length=1, max_length=200)
    value: str = Field(min_length=1, max_length=200)


class EnvelopeHeader(BaseModel):
    """Everything a receiver needs to check and decode a payload."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    study: str = Field(pattern=IDENTIFIER_PATTERN.pattern)
    round: int = Field(ge=0, le=1_000_000)
    site: str = Field(pattern=IDENTIFIER_PATTERN.pattern)
    nonce: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    codec: CodecInfo
    compression: Literal["none", "zstd"] = "none"
    tensors: list[TensorInfo] = Field(min_length=1)
    sample_count: int = Field(gt=0)
    payload_length: int = Field(ge=0)
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    uncompressed_length: int = Field(ge=0)
    signature: SignatureInfo | None = None

    def signing_bytes(self) -> bytes:
        """Return the canonical bytes a signature covers: the header without it.

        The header carries the payload's SHA-256, so a signature over these
        bytes covers the payload as well.
        """
        fields = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def tensor_specs(self) -> list[TensorSpec]:
        return [(t.name, tuple(t.shape), t.dtype) for t in self.tensors]


@dataclass(frozen=True)
class EnvelopeLimits:
    """Size limits a decoder enforces before it allocates anything."""

    max_header_bytes: int = 256 * 1024
    max_payload_bytes: int = 64 * 1024 * 1024
    max_uncompressed_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 4096
    max_elements: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"envelope limit {name} must be a positive integer, got {value!r}"
                )


@dataclass(frozen=True)
class DecodedUpdate:
    header: EnvelopeHeader
    tensors: dict[str, np.ndarray]


def encode_envelope(
    update: Mapping[str, np.ndarray],
    *,
    study: str,
    round_number: int,
    site: str,
    sample_count: int,
    nonce: str,
    codec_name: str = "fp32",
    codec_params: Mapping[str, Any] | None = None,
    compression: Literal["none", "zstd"] = "none",
    zstd_level: int = 3,
    signer: Any = None,
    codec: Encoder | None = None,
) -> bytes:
    """Encode ``update`` (tensor name to float32 array) as an envelope.

    Args:
        zstd_level: zstd's compression level (1 to 22) when ``compression``
            is "zstd". The decoder does not depend on it.
        signer: an object with ``key_id`` and ``sign(bytes) -> str`` (base64),
            or None for an unsigned envelope.
        codec: a codec already built, or a wrapper around one such as the
            site's error feedback; when given, ``codec_name`` and
            ``codec_params`` are ignored.
    """
    if codec is None:
        codec = get_codec(codec_name, codec_params)
    arrays = codec.encode(update)
    # np.asarray keeps 0-d arrays 0-d, where np.ascontiguousarray makes them 1-d.
    raw = save_safetensors(
        {key: np.asarray(value, order="C") for key, value in arrays.items()}
    )
    payload = (
        zstandard.ZstdCompressor(level=zstd_level).compress(raw)
        if compression == "zstd"
        else raw
    )
    header = EnvelopeHeader(
        study=study,
        round=round_number,
        site=site,
        nonce=nonce,
        # Read after encode: randk records the seed it drew while encoding.
        codec=CodecInfo(name=codec.name, params=codec.params),
        compression=compression,
        tensors=[
            TensorInfo(name=name, shape=list(np.shape(value)))
            for name, value in update.items()
        ],
        sample_count=sample_count,
        payload_length=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        uncompressed_length=len(raw),
    )
    if signer is not None:
        signature = SignatureInfo(
            key_id=signer.key_id, value=signer.sign(header.signing_bytes())
        )
        header = header.model_copy(update={"signature": signature})
    header_bytes = header.model_dump_json(exclude_none=True).encode()
    return (
        _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + payload
    )


def read_header(
    data: bytes, limits: EnvelopeLimits | None = None
) -> tuple[EnvelopeHeader, memoryview]:
    """Parse and check an envelope's header; return it and the raw payload.

    Checks the magic, version, header size, the declared payload length
    against the bytes present, the payload hash and every size limit. Does
    not decompress or decode the payload.
    """
    limits = limits or EnvelopeLimits()
    if len(data) < _PREFIX.size:
        raise EnvelopeError(
            f"envelope is truncated: {len(data)} bytes, shorter than the "
            f"{_PREFIX.size}-byte prefix"
        )
    magic, version, header_length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise EnvelopeError(
            "envelope magic is not b'MFED': this is not a medfed update"
        )
    if version != FORMAT_VERSION:
        raise EnvelopeError(
            f"envelope format_version {version} is not supported; this service "
            f"reads version {FORMAT_VERSION}"
        )
    if header_length > limits.max_header_bytes:
        raise EnvelopeError(
            f"envelope header_length {header_length} exceeds the limit of "
            f"{limits.max_header_bytes} bytes"
        )
    header_end = _PREFIX.size + header_length
    if len(data) < header_end:
        raise EnvelopeError(
            f"envelope is truncated: header_length is {header_length} but only "
            f"{len(data) - _PREFIX.size} header bytes are present"
        )
    try:
        header = EnvelopeHeader.model_validate_json(data[_PREFIX.size : header_end])
    except ValidationError as error:
        raise EnvelopeError(f"invalid envelope header: {_describe(error)}") from None
    _check_header_limits(header, limits)

    payload = memoryview(data)[header_end:]
    if len(payload) != header.payload_length:
        raise EnvelopeError(
            f"envelope payload_length is {header.payload_length} but "
            f"{len(payload)} payload bytes are present"
        )
    if hashlib.sha256(payload).hexdigest() != header.payload_sha256:
        raise EnvelopeError("envelope payload_sha256 does not match the payload")
    return header, payload


def decode_envelope(
    data: bytes,
    limits: EnvelopeLimits | None = None,
    *,
    verify_signature: Any = None,
) -> DecodedUpdate:
    """Check and decode an envelope into float32 tensors.

    Args:
        verify_signature: called as ``verify_signature(header)`` after the
            header checks and before any decompression or decoding; it raises
            to reject the envelope.

    Raises:
        EnvelopeError: the envelope is malformed, oversized, inconsistent or
            carries a non-finite value.
    """
    limits = limits or EnvelopeLimits()
    header, payload = read_header(data, limits)
    if verify_signature is not None:
        verify_signature(header)
    try:
        codec = get_codec(header.codec.name, header.codec.params)
    except ConfigError as error:
        raise EnvelopeError(f"invalid envelope codec: {error}") from None
    raw = _decompress(header, payload, limits)
    try:
        arrays = load_safetensors(raw)
    # safetensors raises KeyError for dtypes NumPy lacks (BF16, F8_*).
    except (SafetensorError, ValueError, TypeError, KeyError) as error:
        raise EnvelopeError(
            f"envelope payload is not a valid safetensors file: {error}"
        ) from None

    tensors = codec.decode(arrays, header.tensor_specs())
    for name, value in tensors.items():
        if not np.isfinite(value).all():
            raise EnvelopeError(f"tensor {name!r} contains NaN or infinite values")
    return DecodedUpdate(header=header, tensors=tensors)


def _check_header_limits(header: EnvelopeHeader, limits: EnvelopeLimits) -> None:
    if len(header.tensors) > limits.max_tensors:
        raise EnvelopeError(
            f"envelope declares {len(header.tensors)} tensors, more than the "
            f"limit of {limits.max_tensors}"
        )
    names = [tensor.name for tensor in header.tensors]
    if len(set(names)) != len(names):
        raise EnvelopeError("envelope tensors list names a tensor twice")
    for tensor in header.tensors:
        # A zero-size dimension makes the product 0, so each dimension is
        # bounded on its own before anything builds an array of that shape.
        if any(size > limits.max_elements for size in tensor.shape):
            raise EnvelopeError(
                f"envelope tensor {tensor.name!r} has shape {tensor.shape} with a "
                f"dimension above the limit of {limits.max_elements} elements"
            )
    elements = sum(math.prod(tensor.shape) for tensor in header.tensors)
    if elements > limits.max_elements:
        raise EnvelopeError(
            f"envelope declares {elements} tensor elements, more than the limit "
            f"of {limits.max_elements}"
        )
    if header.payload_length > limits.max_payload_bytes:
        raise EnvelopeError(
            f"envelope payload_length {header.payload_length} exceeds the limit "
            f"of {limits.max_payload_bytes} bytes"
        )
    if header.uncompressed_length > limits.max_uncompressed_bytes:
        raise EnvelopeError(
            f"envelope uncompressed_length {header.uncompressed_length} exceeds "
            f"the limit of {limits.max_uncompressed_bytes} bytes"
        )
    if (
        header.compression == "none"
        and header.uncompressed_length != header.payload_length
    ):
        raise EnvelopeError(
            "envelope uncompressed_length must equal payload_length when "
            "compression is 'none'"
        )


def _decompress(
    header: EnvelopeHeader, payload: memoryview, limits: EnvelopeLimits
) -> bytes:
    if header.compression == "none":
        return bytes(payload)
    try:
        # decompress() allocates the content size written in the frame
        # header and uses max_output_size only when the frame omits it, so
        # a frame declaring more than uncompressed_length (a zstd bomb) is
        # rejected before decompressing. Trailing bytes after the frame are
        # rejected as well.
        frame_size = zstandard.frame_content_size(payload)
        if frame_size not in (-1, header.uncompressed_length):
            raise EnvelopeError(
                f"envelope uncompressed_length is {header.uncompressed_length} "
                f"but the zstd frame declares {frame_size} bytes"
            )
        raw = zstandard.ZstdDecompressor().decompress(
            payload,
            max_output_size=header.uncompressed_length,
            allow_extra_data=False,
        )
    except zstandard.ZstdError as error:
        raise EnvelopeError(
            f"envelope payload failed zstd decompression: {error}"
        ) from None
    if len(raw) != header.uncompressed_length:
        raise EnvelopeError(
            f"envelope uncompressed_length is {header.uncompressed_length} but the "
            f"payload decompresses to {len(raw)} bytes"
        )
    return raw


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        location = ".".join(str(part) for part in item["loc"]) or "header"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)
