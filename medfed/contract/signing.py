"""Ed25519 signatures on update envelopes.

A site signs ``EnvelopeHeader.signing_bytes()``: the canonical header without
its signature. The header carries the payload's SHA-256, so one signature
covers header and payload. The aggregation service stores each site's public
key (from the site registry written at provisioning) and passes a
``SignatureVerifier`` to ``decode_envelope``, which calls it after the header
checks and before any decompression or decoding. An envelope that is
unsigned, signed with a key not registered for its site, or whose signature
does not verify is rejected with ``SignatureError``, so the decoder never
touches a payload of unknown origin.

Key files: private keys are PKCS#8 PEM; public keys travel as the 32 raw
bytes, base64-encoded, in a JSON site registry (see ``render_site_registry``).
"""

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from medfed.contract.ids import validate_identifier
from medfed.contract.wire import EnvelopeHeader
from medfed.errors import ConfigError, SignatureError

__all__ = [
    "REGISTRY_FORMAT",
    "Ed25519Signer",
    "SignatureVerifier",
    "key_id_for",
    "load_private_key",
    "load_site_registry",
    "public_key_from_base64",
    "public_key_to_base64",
    "render_site_registry",
]

REGISTRY_FORMAT = 1


def key_id_for(public_key: Ed25519PublicKey) -> str:
    """Return a short, stable name for ``public_key``: a SHA-256 fingerprint."""
    digest = hashlib.sha256(_raw_public_bytes(public_key)).hexdigest()
    return f"ed25519:{digest[:32]}"


def public_key_to_base64(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(_raw_public_bytes(public_key)).decode("ascii")


def public_key_from_base64(text: str) -> Ed25519PublicKey:
    """Parse a base64 raw Ed25519 public key.

    Raises:
        ConfigError: the text is not base64 of 32 bytes.
    """
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as error:
        raise ConfigError(
            f"invalid Ed25519 public key {text[:16]!r}...: expected base64 of 32 "
            f"raw bytes ({error})"
        ) from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key.

    Raises:
        ConfigError: the file is missing or contains no Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"cannot read the Ed25519 private key at {path}: {error}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"the private key at {path} is a {type(key).__name__}, expected Ed25519"
        )
    return key


class Ed25519Signer:
    """Signs envelope headers for one site; the ``signer`` of ``encode_envelope``."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.key_id = key_id_for(private_key.public_key())

    @classmethod
    def from_file(cls, path: Path) -> "Ed25519Signer":
        return cls(load_private_key(path))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private_key.public_key()

    def sign(self, data: bytes) -> str:
        """Return the base64 Ed25519 signature of ``data``."""
        return base64.b64encode(self._private_key.sign(data)).decode("ascii")

    def __repr__(self) -> str:
        return f"Ed25519Signer(key_id={self.key_id!r})"


class SignatureVerifier:
    """Checks that an envelope is signed by the key registered for its site.

    Pass an instance as ``decode_envelope(..., verify_signature=verifier)``.
    It raises ``SignatureError`` to reject the envelope and returns None to
    accept it.
    """

    def __init__(self, site_keys: Mapping[str, Ed25519PublicKey]) -> None:
        self._keys = {
            validate_identifier(site, kind="site"): key
            for site, key in site_keys.items()
        }
        self._key_ids = {site: key_id_for(key) for site, key in self._keys.items()}

    @classmethod
    def from_registry(cls, path: Path) -> "SignatureVerifier":
        """Load the site registry JSON that ``render_site_registry`` renders.

        Raises:
            ConfigError: as ``load_site_registry``.
        """
        return cls(load_site_registry(path))

    @property
    def sites(self) -> list[str]:
        return sorted(self._keys)

    @property
    def site_keys(self) -> Mapping[str, Ed25519PublicKey]:
        """Each registered site's Ed25519 public key, read-only."""
        return MappingProxyType(self._keys)

    def __call__(self, header: EnvelopeHeader) -> None:
        """Verify ``header.signature`` over ``header.signing_bytes()``.

        Raises:
            SignatureError: the envelope is unsigned, its site has no
                registered key, its key_id is not the site's, or the signature
                does not verify.
        """
        site = header.site
        if header.signature is None:
            raise SignatureError(
                f"envelope from site {site!r} is unsigned: sign it with the "
                "site's Ed25519 key from its startup kit"
            )
        if site not in self._keys:
            raise SignatureError(
                f"no signing key is registered for site {site!r}: provision the "
                "site and restart the aggregation service with the new registry"
            )
        if header.signature.key_id != self._key_ids[site]:
            raise SignatureError(
                f"envelope from site {site!r} is signed with key_id "
                f"{header.signature.key_id!r}, but the key registered for that "
                f"site is {self._key_ids[site]!r}"
            )
        try:
            signature = base64.b64decode(header.signature.value, validate=True)
        except binascii.Error:
            raise SignatureError(
                f"envelope signature from site {site!r} is not valid base64"
            ) from None
        try:
            self._keys[site].verify(signature, header.signing_bytes())
        except InvalidSignature:
            raise SignatureError(
                f"envelope signature from site {site!r} does not verify: the "
                "header or payload was changed after signing, or another key "
                "signed it"
            ) from None


def load_site_registry(
    path: Path, *, study: str | None = None
) -> dict[str, Ed25519PublicKey]:
    """Load each site's Ed25519 public key from a registry ``render_site_registry`` wrote.

    Args:
        path: the registry file.
        study: when set, the study the registry must be for.

    Raises:
        ConfigError: the file is missing or malformed, a stored key_id does
            not match its public key, or the registry is for another study.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        version = document.get("format")
        registry_study = document.get("study")
        entries = {
            site: (entry["key_id"], entry["public_key"])
            for site, entry in document["sites"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"cannot read the site registry {path}: {error}") from None
    if version != REGISTRY_FORMAT:
        raise ConfigError(
            f"site registry {path} has format {version!r}, expected {REGISTRY_FORMAT}"
        )
    if study is not None and registry_study != study:
        raise ConfigError(
            f"site registry {path} is for study {registry_study!r}, not {study!r}: "
            "use the startup kit provisioned for this study"
        )
    keys = {}
    for site, (key_id, encoded_key) in entries.items():
        key = public_key_from_base64(encoded_key)
        if key_id != key_id_for(key):
            raise ConfigError(
                f"site registry {path}: key_id {key_id!r} of site {site!r} "
                "does not match its public key"
            )
        keys[site] = key
    return keys


def render_site_registry(
    *, study: str, site_keys: Mapping[str, Ed25519PublicKey]
) -> bytes:
    """Return the JSON registry of site public keys that the service and sites load."""
    document = {
        "format": REGISTRY_FORMAT,
        "study": validate_identifier(study, kind="study"),
        "sites": {
            validate_identifier(site, kind="site"): {
                "key_id": key_id_for(key),
                "public_key": public_key_to_base64(key),
            }
            for site, key in sorted(site_keys.items())
        },
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


def _raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )
