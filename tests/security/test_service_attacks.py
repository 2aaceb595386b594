"""Attacks on the running aggregation service over real mutual TLS.

Each test talks to uvicorn on 127.0.0.1 with certificates from a provisioned
study and checks that a hostile request is rejected with a clear message,
changes no state, and never makes the service import, write or allocate what
the request names.
"""

import json
import pickle
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from medfed.aggregation.audit import verify
from medfed.aggregation.service import ServiceSettings, create_app
from medfed.contract.kits import KitFiles, client_ssl_context
from medfed.contract.signing import Ed25519Signer, public_key_from_base64
from medfed.contract.wire import _PREFIX, EnvelopeHeader, encode_envelope
from medfed.sites.client import AggregationClient

from .federation import (
    STUDY,
    client,
    initial_model,
    signed_envelope,
    site_delta,
    upload_path,
)
from .servers import raw_https, serve

SITES = ("alpha", "beta")
MAX_UPLOAD_BYTES = 1024 * 1024


class _WriteOnUnpickle:
    """Unpickling this writes a marker file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.fixture(scope="module")
def service(kits, tmp_path_factory) -> Iterator[dict]:
    state_dir = tmp_path_factory.mktemp("state")
    settings = ServiceSettings(
        state_dir=state_dir,
        kit_dir=kits["aggregation"],
        max_upload_bytes=MAX_UPLOAD_BYTES,
    )
    app = create_app(settings)
    with serve(app, **app.state.security.uvicorn_options()) as url:
        with client(url, kits["coordinator"]) as coordinator:
            _, body = initial_model(SITES)
            created = coordinator.post(f"/v1/studies/{STUDY}", content=body)
            assert created.status_code == 201, created.text
            opened = coordinator.post(
                f"/v1/studies/{STUDY}/rounds/0",
                json={"sites": list(SITES), "quorum": 2, "deadline_seconds": 600},
            )
            assert opened.status_code == 200, opened.text
        yield {"url": url, "state_dir": state_dir, "app": app}


def _state_files(state_dir: Path) -> set[str]:
    return {str(path.relative_to(state_dir)) for path in state_dir.rglob("*")}


def _uploads(service, kits) -> list[str]:
    with client(service["url"], kits["coordinator"]) as coordinator:
        status = coordinator.get(f"/v1/studies/{STUDY}/rounds/0").json()
    return status["uploaded"]


def test_pickle_body_rejected(service, kits, tmp_path) -> None:
    marker = tmp_path / "marker"
    attack = pickle.dumps(_WriteOnUnpickle(marker))
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=attack)
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "invalid update envelope: envelope magic is not b'MFED': this is not a "
        "medfed update"
    )
    assert not marker.exists()
    assert _uploads(service, kits) == []


def test_signed_pickle_payload_rejected(service, kits, tmp_path) -> None:
    """A site's own key signing a pickle payload still never gets it unpickled."""
    import hashlib

    marker = tmp_path / "marker"
    payload = pickle.dumps(_WriteOnUnpickle(marker))
    change = {
        "payload_length": len(payload),
        "uncompressed_length": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    attack = _resign(kits, "alpha", change, payload=payload)
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=attack)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(
        "invalid update envelope: envelope payload is not a valid safetensors file"
    )
    assert not marker.exists()
    assert _uploads(service, kits) == []


def test_unknown_codec_rejected(service, kits) -> None:
    modules = set(sys.modules)
    change = {"codec": {"name": "torch-pickle", "params": {"module": "os"}}}
    attack = _resign(kits, "alpha", change)
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=attack)
    assert response.status_code == 400
    assert response.json()["detail"].startswith(
        "invalid update envelope: invalid envelope codec: unknown codec 'torch-pickle': choose one of"
    )
    assert set(sys.modules) - modules == set()
    assert _uploads(service, kits) == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/studies/heart/rounds/0/updates/..%2Fx",
        "/v1/studies/heart/rounds/0/updates/%2Fetc%2Fpasswd",
        "/v1/studies/..%2F..%2Ftmp/rounds/0/updates/alpha",
        "/v1/studies/%2Ftmp%2Fevil/rounds/0/updates/alpha",
        "/v1/studies/heart/rounds/0/updates/../../../../tmp/x",
        "/v1/studies/heart/rounds/0/updates/ALPHA",
    ],
)
def test_path_traversal_rejected(service, kits, path) -> None:
    before = _state_files(service["state_dir"])
    envelope = signed_envelope(kits, "alpha", 0)
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(path, content=envelope)
    assert response.status_code in (403, 404, 422), response.text
    assert _state_files(service["state_dir"]) == before | {"audit.jsonl.head.json"}
    assert not Path("/tmp/x").exists()
    assert not Path("/tmp/evil").exists()
    assert _uploads(service, kits) == []


def test_traversal_site_in_header_rejected(service, kits) -> None:
    envelope = _resign_raw(kits, {"site": "../x"})
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=envelope)
    assert response.status_code == 400
    assert (
        "invalid envelope header: site: String should match pattern"
        in (response.json()["detail"])
    )


def test_declared_oversize_rejected(service, kits) -> None:
    """A 10 GiB Content-Length gets 413 before a byte of the body is read."""
    request = (
        f"PUT {upload_path(0, 'alpha')} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-length: {10 * 1024**3}\r\n\r\n"
    ).encode() + b"MFED"
    context = client_ssl_context(kits["site-alpha"])
    status, body = raw_https(service["url"], request, context)
    assert status == 413
    assert json.loads(body)["detail"] == (
        f"request body of {10 * 1024**3} bytes exceeds the limit of "
        f"{MAX_UPLOAD_BYTES} bytes"
    )
    assert _uploads(service, kits) == []


def test_streamed_oversize_rejected(service, kits) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_UPLOAD_BYTES // 65536 + 2):
            yield b"\0" * 65536

    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=chunks())
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"request body exceeds the limit of {MAX_UPLOAD_BYTES} bytes"
    )


def test_huge_declared_tensor_rejected(service, kits) -> None:
    """A header announcing 10^10 elements is rejected before any allocation."""
    envelope = _resign(
        kits,
        "alpha",
        {"tensors": [{"name": "linear.weight", "shape": [100000, 100000]}]},
    )
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=envelope)
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "invalid update envelope: envelope declares 10000000000 tensor elements, "
        "more than the limit of 67108864"
    )


def test_zstd_bomb_rejected(service, kits) -> None:
    """A payload that inflates past its declared size is cut at that size."""
    import hashlib

    import zstandard

    payload = zstandard.ZstdCompressor().compress(b"\0" * (8 * 1024 * 1024))
    envelope = _resign(
        kits,
        "alpha",
        {
            "compression": "zstd",
            "payload_length": len(payload),
            "uncompressed_length": 1024,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        },
        payload=payload,
    )
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=envelope)
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "invalid update envelope: envelope uncompressed_length is 1024 but the "
        f"zstd frame declares {8 * 1024 * 1024} bytes"
    )


def test_other_site_url_rejected(service, kits) -> None:
    envelope = signed_envelope(kits, "beta", 0)
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "beta"), content=envelope)
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "client certificate is for site 'alpha' but the request is for site "
        "'beta': a site can act only as itself"
    )


def test_envelope_signed_by_other_site_rejected(service, kits) -> None:
    envelope = _resign(kits, "beta", {"site": "alpha"})
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=envelope)
    assert response.status_code == 403
    assert "is signed with key_id" in response.json()["detail"]


def test_unsigned_envelope_rejected(service, kits) -> None:
    envelope = encode_envelope(
        site_delta("alpha", 0),
        study=STUDY,
        round_number=0,
        site="alpha",
        sample_count=10,
        nonce="00000000deadbeef",
    )
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.put(upload_path(0, "alpha"), content=envelope)
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "invalid update envelope: envelope from site 'alpha' is unsigned: sign it "
        "with the site's Ed25519 key from its startup kit"
    )


def test_site_cannot_finalize(service, kits) -> None:
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.post(f"/v1/studies/{STUDY}/rounds/0/finalize", json={})
    assert response.status_code == 403
    assert "only the coordinator may call this endpoint" in response.json()["detail"]


def test_no_certificate_rejected(service, kits) -> None:
    context = ssl.create_default_context(
        cafile=str(kits["site-alpha"] / KitFiles.CA_CERT)
    )
    with httpx.Client(base_url=service["url"], verify=context) as anonymous:
        response = anonymous.get(f"/v1/studies/{STUDY}/models/0")
        health = anonymous.get("/health")
        schema = anonymous.get("/openapi.json")
        docs = anonymous.get("/docs")
    assert response.status_code == 401
    assert response.json()["detail"] == (
        "client certificate required: connect over TLS with the participant's "
        "certificate from its startup kit"
    )
    assert health.status_code == 200
    assert schema.status_code == 404
    assert docs.status_code == 404


def test_privacy_report_audited(service, kits) -> None:
    with AggregationClient.with_kit(service["url"], kits["site-beta"]) as beta:
        beta.report_privacy(
            STUDY, 0, "beta", status="refused", epsilon_spent=0.98, delta=1e-3,
            message="round 0 would spend epsilon 1.2, over the budget of 1.0",
        )  # fmt: skip
    with client(service["url"], kits["site-alpha"]) as alpha:
        forged = alpha.post(
            f"/v1/studies/{STUDY}/rounds/0/privacy/beta",
            json={"status": "spent", "epsilon_spent": 0.1, "delta": 1e-3},
        )
    assert forged.status_code == 403
    log = service["state_dir"] / "audit.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [e for e in entries if e["event"] == "privacy.refused"]
    assert len(refused) == 1
    assert refused[0]["actor"] == "beta"
    assert refused[0]["details"]["epsilon_spent"] == 0.98
    assert refused[0]["details"]["message"].startswith("round 0 would spend")
    assert not any(e["event"] == "privacy.spent" for e in entries)


def test_round_completes_and_audit_verifies(service, kits) -> None:
    """Runs last: honest uploads still go through after every attack above."""
    with client(service["url"], kits["site-alpha"]) as alpha:
        model = alpha.get(f"/v1/studies/{STUDY}/models/0")
        assert model.status_code == 200
        first = alpha.put(
            upload_path(0, "alpha"), content=signed_envelope(kits, "alpha", 0)
        )
        again = alpha.put(
            upload_path(0, "alpha"), content=signed_envelope(kits, "alpha", 0)
        )
    with client(service["url"], kits["site-beta"]) as beta:
        second = beta.put(
            upload_path(0, "beta"), content=signed_envelope(kits, "beta", 0)
        )
    assert first.status_code == 200, first.text
    assert again.json()["receipt"] == first.json()["receipt"]
    assert second.status_code == 200, second.text
    with client(service["url"], kits["coordinator"]) as coordinator:
        finalized = coordinator.post(f"/v1/studies/{STUDY}/rounds/0/finalize", json={})
    assert finalized.json()["state"] == "finalized"
    assert finalized.json()["result_version"] == 1

    log = service["state_dir"] / "audit.jsonl"
    head = json.loads((service["state_dir"] / "audit.jsonl.head.json").read_text())
    public_key = public_key_from_base64(
        (kits["coordinator"] / KitFiles.AUDIT_PUBLIC_KEY).read_text().strip()
    )
    assert verify(log, signed_head=head, public_key=public_key).ok
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    events = [(entry["event"], entry["actor"]) for entry in entries]
    assert events[0] == ("service.started", "aggregation")
    assert ("model.registered", "coordinator") in events
    assert ("round.opened", "coordinator") in events
    assert ("model.downloaded", "alpha") in events
    assert ("site.authenticated", "alpha") in events
    assert events.count(("update.accepted", "alpha")) == 2
    alpha_accepted = [
        entry["details"]["duplicate"]
        for entry in entries
        if (entry["event"], entry["actor"]) == ("update.accepted", "alpha")
    ]
    assert alpha_accepted == [False, True]
    assert ("update.accepted", "beta") in events
    assert events[-2:] == [
        ("round.finalized", "coordinator"),
        ("model.registered", "aggregation"),
    ]
    reasons = [
        e["details"]["reason"] for e in entries if e["event"] == "update.rejected"
    ]
    assert any("unknown codec 'torch-pickle'" in reason for reason in reasons)
    assert any("is unsigned" in reason for reason in reasons)
    text = log.read_text()
    assert "PRIVATE KEY" not in text
    assert "linear.weight" not in text


def _resign(
    kits: dict[str, Path], signer_site: str, change: dict, payload: bytes | None = None
) -> bytes:
    """Return alpha's round-0 envelope with ``change``, signed by ``signer_site``."""
    signer = Ed25519Signer.from_file(kits[f"site-{signer_site}"] / KitFiles.SIGNING_KEY)
    envelope = signed_envelope(kits, "alpha", 0)
    _, _, length = _PREFIX.unpack_from(envelope)
    header = json.loads(envelope[_PREFIX.size : _PREFIX.size + length])
    header.pop("signature")
    header.update(change)
    parsed = EnvelopeHeader.model_validate(header)
    header["signature"] = {
        "algorithm": "ed25519",
        "key_id": signer.key_id,
        "value": signer.sign(parsed.signing_bytes()),
    }
    raw = json.dumps(header).encode()
    body = envelope[_PREFIX.size + length :] if payload is None else payload
    return _PREFIX.pack(b"MFED", 1, len(raw)) + raw + body


def _resign_raw(kits: dict[str, Path], change: dict) -> bytes:
    """Like ``_resign`` for changes the header model itself rejects (no re-signing)."""
    envelope = signed_envelope(kits, "alpha", 0)
    _, _, length = _PREFIX.unpack_from(envelope)
    header = json.loads(envelope[_PREFIX.size : _PREFIX.size + length])
    header.update(change)
    raw = json.dumps(header).encode()
    return _PREFIX.pack(b"MFED", 1, len(raw)) + raw + envelope[_PREFIX.size + length :]


def test_aborted_round_audited(service, kits) -> None:
    """Runs after the finalized round: round 1 misses its quorum and is aborted."""
    with AggregationClient.with_kit(service["url"], kits["coordinator"]) as coordinator:
        coordinator.open_round(
            STUDY, 1, sites=list(SITES), quorum=2, deadline_seconds=600
        )
        with AggregationClient.with_kit(service["url"], kits["site-alpha"]) as alpha:
            receipt = alpha.upload(STUDY, 1, "alpha", signed_envelope(kits, "alpha", 1))
        status = coordinator.finalize(STUDY, 1, absent=["beta"])
    assert receipt["site"] == "alpha"
    assert status["state"] == "aborted"
    log = service["state_dir"] / "audit.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "round.aborted"
    assert last["actor"] == "coordinator"
    assert last["details"]["round"] == 1
    assert "fewer than its quorum of 2" in last["details"]["reason"]
    assert verify(log).ok


def test_every_route_authenticates(service) -> None:
    """A route added later without an authentication dependency fails here."""
    from fastapi.routing import APIRoute

    from medfed.aggregation.tls import (
        authenticated_coordinator,
        authenticated_participant,
        authenticated_site,
    )

    checks = {authenticated_coordinator, authenticated_participant, authenticated_site}

    def calls(dependant) -> set:
        found = {dependant.call}
        for child in dependant.dependencies:
            found |= calls(child)
        return found

    unprotected = [
        route.path
        for route in service["app"].routes
        if isinstance(route, APIRoute)
        and route.path != "/health"
        and not calls(route.dependant) & checks
    ]
    assert unprotected == []


MASKING = f"/v1/studies/{STUDY}/rounds/0/secagg"
ADVERTISEMENT = {
    "site": "beta",
    "mask_public_key": "A" * 43 + "=",
    "share_public_key": "B" * 43 + "=",
    "self_mask_commitment": "0" * 64,
}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/keys", ADVERTISEMENT),
        ("GET", "/shares/beta", None),
        ("PUT", "/masked/beta", None),
        (
            "POST",
            "/reveals",
            {"site": "beta", "self_mask_shares": {}, "mask_key_shares": {}},
        ),
    ],
)
def test_masking_route_as_other_site_rejected(
    service, kits, method, path, body
) -> None:
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.request(method, MASKING + path, json=body)
    assert response.status_code == 403
    assert response.json()["detail"] == "site 'alpha' may not act as site 'beta'"


@pytest.mark.parametrize("phase", ["keys", "shares", "uploads"])
def test_site_cannot_close_masking_phase(service, kits, phase) -> None:
    with client(service["url"], kits["site-alpha"]) as site:
        response = site.post(f"{MASKING}/{phase}/close")
    assert response.status_code == 403
    assert response.json()["detail"] == "only the coordinator may close a masking phase"
