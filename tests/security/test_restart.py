"""Killing the aggregation service mid-round loses nothing and changes nothing.

The service runs as its own process over mutual TLS. One run is killed with
SIGKILL between the two sites' uploads and restarted on the same state
directory; the other runs without interruption. Both must publish the same
model, bit for bit, and keep a valid audit chain.
"""

import json
from pathlib import Path

from medfed.aggregation.audit import verify

from .federation import STUDY, client, initial_model, signed_envelope, upload_path
from .processes import ServiceProcess

SITES = ("alpha", "beta")


def _open_round(url: str, kits: dict[str, Path]) -> None:
    with client(url, kits["coordinator"]) as coordinator:
        _, body = initial_model(SITES)
        assert coordinator.post(f"/v1/studies/{STUDY}", content=body).status_code == 201
        opened = coordinator.post(
            f"/v1/studies/{STUDY}/rounds/0",
            json={"sites": list(SITES), "quorum": 2, "deadline_seconds": 600},
        )
        assert opened.status_code == 200, opened.text


def _upload(url: str, kits: dict[str, Path], site: str) -> dict:
    with client(url, kits[f"site-{site}"]) as session:
        response = session.put(
            upload_path(0, site), content=signed_envelope(kits, site, 0)
        )
    assert response.status_code == 200, response.text
    return response.json()


def _finish(url: str, kits: dict[str, Path]) -> tuple[bytes, str]:
    with client(url, kits["coordinator"]) as coordinator:
        finalized = coordinator.post(f"/v1/studies/{STUDY}/rounds/0/finalize", json={})
        assert finalized.status_code == 200, finalized.text
        assert finalized.json()["state"] == "finalized"
        model = coordinator.get(f"/v1/studies/{STUDY}/models/1")
    assert model.status_code == 200
    return model.content, model.headers["X-Medfed-Model-Sha256"]


def test_kill_between_uploads_same_model(kits, tmp_path) -> None:
    reference = ServiceProcess(tmp_path / "reference", kits["aggregation"]).start()
    try:
        _open_round(reference.url, kits)
        for site in SITES:
            _upload(reference.url, kits, site)
        expected_model, expected_sha = _finish(reference.url, kits)
    finally:
        reference.stop()

    state_dir = tmp_path / "interrupted"
    service = ServiceProcess(state_dir, kits["aggregation"]).start()
    try:
        _open_round(service.url, kits)
        receipt = _upload(service.url, kits, "alpha")["receipt"]
        service.kill()
        service.start()
        with client(service.url, kits["coordinator"]) as coordinator:
            status = coordinator.get(f"/v1/studies/{STUDY}/rounds/0").json()
        assert status["state"] == "open"
        assert status["uploaded"] == ["alpha"]
        # A site whose upload outlived the crash may retry: same receipt, counted once.
        assert _upload(service.url, kits, "alpha")["receipt"] == receipt
        _upload(service.url, kits, "beta")
        model, sha = _finish(service.url, kits)
    finally:
        service.stop()

    assert sha == expected_sha
    assert model == expected_model
    log = state_dir / "audit.jsonl"
    assert verify(log).ok
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events.count("service.started") == 2
    assert events[-3:] == ["round.finalized", "model.registered", "model.downloaded"]
