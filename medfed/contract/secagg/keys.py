"""Key agreement: X25519 key pairs and the secrets derived from them.

Each site has two X25519 key pairs per round. The *mask key* agrees a
pairwise mask seed with every other site; its private half is secret-shared
so that the survivors can cancel the masks of a site that drops out. The
*share key* agrees the AES-256-GCM key that encrypts Shamir shares from one
site to another, so the aggregation service that relays them cannot read
them. Both shared secrets go through HKDF-SHA256 with an ``info`` string that
binds the purpose, the study, the round and the two site ids, so no derived
key is reused across purposes, rounds or pairs.
"""

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medfed.errors import SecureAggregationError

__all__ = [
    "KEY_BYTES",
    "RoundContext",
    "SiteKeyPairs",
    "decode_key",
    "derive_pairwise_secret",
    "encode_key",
    "private_key_bytes",
    "public_key_bytes",
    "self_mask_commitment",
]

KEY_BYTES = 32
_DOMAIN = b"medfed-secagg/v1/"


@dataclass(frozen=True)
class RoundContext:
    """The study and round every derived secret is bound to."""

    study: str
    round_number: int

    def to_bytes(self) -> bytes:
        return f"{self.study}\x00{self.round_number}".encode()


@dataclass(frozen=True)
class SiteKeyPairs:
    """A site's two X25519 key pairs for one round."""

    mask_key: X25519PrivateKey
    share_key: X25519PrivateKey

    @classmethod
    def generate(cls) -> "SiteKeyPairs":
        return cls(
            mask_key=X25519PrivateKey.generate(),
            share_key=X25519PrivateKey.generate(),
        )


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def private_key_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def encode_key(raw: bytes) -> str:
    """Return the base64 text of a raw 32-byte key, as messages carry it."""
    return base64.b64encode(raw).decode("ascii")


def decode_key(text: str, *, field: str) -> bytes:
    """Return the raw 32 bytes of a base64 key.

    Raises:
        SecureAggregationError: ``text`` is not base64 of 32 bytes; the message
            names ``field``.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecureAggregationError(f"{field} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise SecureAggregationError(
            f"{field} must encode {KEY_BYTES} bytes, got {len(raw)}"
        )
    return raw


def derive_pairwise_secret(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    *,
    purpose: str,
    context: RoundContext,
    site: str,
    peer: str,
) -> bytes:
    """Derive the 32-byte secret that ``site`` and ``peer`` share for ``purpose``.

    Both sides get the same bytes because the site ids enter ``info`` in
    sorted order.

    Raises:
        SecureAggregationError: the peer's public key is a low-order point
            (X25519 then yields all zeros, which ``cryptography`` rejects).
    """
    try:
        shared = private_key.exchange(
            X25519PublicKey.from_public_bytes(peer_public_key)
        )
    except ValueError:
        raise SecureAggregationError(
            f"key agreement with site {peer!r} failed: its public key is invalid"
        ) from None
    low, high = sorted((site, peer))
    info = (
        _DOMAIN
        + purpose.encode()
        + b"\x00"
        + context.to_bytes()
        + b"\x00"
        + f"{low}\x00{high}".encode()
    )
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info
    ).derive(shared)


def self_mask_commitment(seed: bytes, *, context: RoundContext, site: str) -> str:
    """Return the SHA-256 commitment (hex) a site publishes for its self-mask seed.

    The seed is 32 random bytes, so the hash reveals nothing usable about it,
    and it lets the service check a rebuilt seed before it subtracts the mask.
    """
    digest = hashlib.sha256(
        _DOMAIN + b"self-mask\x00" + context.to_bytes() + b"\x00" + site.encode()
    )
    digest.update(seed)
    return digest.hexdigest()
