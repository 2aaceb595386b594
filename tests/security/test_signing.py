"""Envelope signatures: verified before decoding, any flipped byte rejected."""

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.contract.kits import KitFiles
from medfed.contract.signing import Ed25519Signer, SignatureVerifier
from medfed.contract.wire import _PREFIX, decode_envelope, encode_envelope
from medfed.errors import ConfigError, EnvelopeError, SignatureError

UPDATE = {
    "weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "bias": np.ones(2, np.float32),
}


def _envelope(signer: Ed25519Signer | None, *, site: str = "alpha", **options) -> bytes:
    return encode_envelope(
        UPDATE,
        study="heart",
        round_number=3,
        site=site,
        sample_count=40,
        nonce="0123456789abcdef",
        signer=signer,
        **options,
    )


@pytest.fixture(scope="module")
def signers(kits: dict[str, Path]) -> dict[str, Ed25519Signer]:
    return {
        site: Ed25519Signer.from_file(kits[f"site-{site}"] / KitFiles.SIGNING_KEY)
        for site in ("alpha", "beta")
    }


@pytest.fixture(scope="module")
def verifier(kits: dict[str, Path]) -> SignatureVerifier:
    return SignatureVerifier.from_registry(kits["aggregation"] / KitFiles.SITE_REGISTRY)


def _replace_header(envelope: bytes, change: dict) -> bytes:
    _, _, length = _PREFIX.unpack_from(envelope)
    header = json.loads(envelope[_PREFIX.size : _PREFIX.size + length])
    header.update(change)
    raw = json.dumps(header).encode()
    payload = envelope[_PREFIX.size + length :]
    return _PREFIX.pack(b"MFED", 1, len(raw)) + raw + payload


def test_signed_envelope_decodes(signers, verifier) -> None:
    decoded = decode_envelope(_envelope(signers["alpha"]), verify_signature=verifier)
    assert decoded.header.signature is not None
    assert decoded.header.signature.key_id == signers["alpha"].key_id
    np.testing.assert_array_equal(decoded.tensors["weight"], UPDATE["weight"])


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_every_flipped_byte_rejected(signers, verifier, compression) -> None:
    envelope = _envelope(signers["alpha"], compression=compression)
    for index in range(len(envelope)):
        tampered = bytearray(envelope)
        tampered[index] ^= 0x01
        with pytest.raises(EnvelopeError):
            decode_envelope(bytes(tampered), verify_signature=verifier)


def test_changed_sample_count_rejected(signers, verifier) -> None:
    tampered = _replace_header(_envelope(signers["alpha"]), {"sample_count": 4000})
    with pytest.raises(SignatureError, match="from site 'alpha' does not verify"):
        decode_envelope(tampered, verify_signature=verifier)


def test_unsigned_envelope_rejected(verifier) -> None:
    with pytest.raises(SignatureError, match="from site 'alpha' is unsigned"):
        decode_envelope(_envelope(None), verify_signature=verifier)


def test_other_site_key_rejected(signers, verifier) -> None:
    envelope = _envelope(signers["beta"], site="alpha")
    with pytest.raises(SignatureError, match="registered for that site is"):
        decode_envelope(envelope, verify_signature=verifier)


def test_unregistered_site_rejected(verifier) -> None:
    signer = Ed25519Signer(Ed25519PrivateKey.generate())
    with pytest.raises(
        SignatureError, match="no signing key is registered for site 'gamma'"
    ):
        decode_envelope(_envelope(signer, site="gamma"), verify_signature=verifier)


def test_signature_checked_before_codec(signers, verifier) -> None:
    """A forged header naming an unknown codec fails on its signature first."""
    tampered = _replace_header(
        _envelope(signers["alpha"]), {"codec": {"name": "pickle", "params": {}}}
    )
    with pytest.raises(SignatureError, match="does not verify"):
        decode_envelope(tampered, verify_signature=verifier)
    with pytest.raises(EnvelopeError, match="unknown codec 'pickle'"):
        decode_envelope(tampered)


def test_registry_key_id_mismatch_rejected(kits, tmp_path) -> None:
    document = json.loads((kits["aggregation"] / KitFiles.SITE_REGISTRY).read_text())
    document["sites"]["alpha"]["key_id"] = "ed25519:" + "0" * 32
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(document))
    with pytest.raises(
        ConfigError, match=r"key_id 'ed25519:0+' of site 'alpha' does not"
    ):
        SignatureVerifier.from_registry(path)


def test_signer_repr_hides_key(signers) -> None:
    assert (
        repr(signers["alpha"]) == f"Ed25519Signer(key_id={signers['alpha'].key_id!r})"
    )


def test_zstd_bomb_not_allocated(signers, verifier) -> None:
    """A frame announcing 1 GiB is read only up to the declared length."""
    import hashlib
    import tracemalloc

    import zstandard

    from medfed.contract.wire import EnvelopeHeader

    payload = zstandard.ZstdCompressor().compress(b"\0" * (1024**3 // 8))
    envelope = _envelope(signers["alpha"], compression="zstd")
    _, _, length = _PREFIX.unpack_from(envelope)
    header = json.loads(envelope[_PREFIX.size : _PREFIX.size + length])
    header.pop("signature")
    header.update(
        payload_length=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )
    parsed = EnvelopeHeader.model_validate(header)
    header["signature"] = {
        "algorithm": "ed25519",
        "key_id": signers["alpha"].key_id,
        "value": signers["alpha"].sign(parsed.signing_bytes()),
    }
    raw = json.dumps(header).encode()
    bomb = _PREFIX.pack(b"MFED", 1, len(raw)) + raw + payload
    tracemalloc.start()
    try:
        with pytest.raises(EnvelopeError, match="the zstd frame declares"):
            decode_envelope(bomb, verify_signature=verifier)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
