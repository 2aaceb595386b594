"""A crash between a committed change and its audit entry loses no entry.

The service runs as its own process over mutual TLS. The test-only variable
``MEDFED_TEST_KILL_BEFORE_AUDIT`` makes it kill itself with SIGKILL after a
change was committed and just before its audit entry is appended. This
simulates a crash at that instant. The service is then restarted without
the variable, and the audit log must list the change once, marked
``recovered``, and verify against the signed head.
"""

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.audit import verify
from medfed.aggregation.security import KILL_BEFORE_AUDIT_VARIABLE
from medfed.contract.kits import KitFiles
from medfed.contract.signing import public_key_from_base64

from .federation import STUDY, client, initial_model, signed_envelope, upload_path
from .processes import ServiceProcess

SITES = ("alpha", "beta")


def _create_study(url: str, kits: dict[str, Path], **settings: Any) -> None:
    weights, _ = initial_model(SITES)
    study_settings = {
        "sites": list(SITES),
        "strategy": "fedavg",
        "strategy_params": {},
        **settings,
    }
    body = save_safetensors(
        weights, metadata={"medfed_study_settings": json.dumps(study_settings)}
    )
    with client(url, kits["coordinator"]) as coordinator:
        created = coordinator.post(f"/v1/studies/{STUDY}", content=body)
    assert created.status_code == 201, created.text


def _open_round(url: str, kits: dict[str, Path]) -> None:
    with client(url, kits["coordinator"]) as coordinator:
        opened = coordinator.post(
            f"/v1/studies/{STUDY}/rounds/0",
            json={"sites": list(SITES), "quorum": 2, "deadline_seconds": 600},
        )
    assert opened.status_code == 200, opened.text


def _upload(url: str, kits: dict[str, Path], site: str) -> httpx.Response:
    with client(url, kits[f"site-{site}"]) as session:
        return session.put(upload_path(0, site), content=signed_envelope(kits, site, 0))


def _upload_asynchronous(url: str, kits: dict[str, Path], site: str) -> httpx.Response:
    path = f"/v1/studies/{STUDY}/asynchronous/0/updates/{site}"
    with client(url, kits[f"site-{site}"]) as session:
        return session.put(path, content=signed_envelope(kits, site, 0))


def _finalize(url: str, kits: dict[str, Path]) -> httpx.Response:
    with client(url, kits["coordinator"]) as coordinator:
        return coordinator.post(f"/v1/studies/{STUDY}/rounds/0/finalize", json={})


def _expect_killed(service: ServiceProcess, send: Any) -> None:
    """Send a request that kills the service, and check it died of SIGKILL."""
    with pytest.raises(httpx.TransportError):
        send()
    assert service.wait_for_exit() == -signal.SIGKILL


def _entries(state_dir: Path) -> list[dict[str, Any]]:
    lines = (state_dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _events(state_dir: Path, event: str, **details: Any) -> list[dict[str, Any]]:
    return [
        entry
        for entry in _entries(state_dir)
        if entry["event"] == event
        and all(entry["details"].get(k) == v for k, v in details.items())
    ]


def _assert_verifies(state_dir: Path, kits: dict[str, Path]) -> None:
    log = state_dir / "audit.jsonl"
    head = json.loads((state_dir / "audit.jsonl.head.json").read_text())
    public_key = public_key_from_base64(
        (kits["coordinator"] / KitFiles.AUDIT_PUBLIC_KEY).read_text().strip()
    )
    result = verify(log, signed_head=head, public_key=public_key)
    assert result.ok, result.reason
    assert head["seq"] == result.entries


def _assert_recovered(entry: dict[str, Any]) -> None:
    assert entry["details"]["recovered"] is True
    assert "stored_at" in entry["details"]


def test_upload_killed_before_audit_recovered(kits, tmp_path) -> None:
    state_dir = tmp_path / "state"
    service = ServiceProcess(state_dir, kits["aggregation"])
    service.start(environment={KILL_BEFORE_AUDIT_VARIABLE: "update.accepted"})
    try:
        _create_study(service.url, kits)
        _open_round(service.url, kits)
        _expect_killed(service, lambda: _upload(service.url, kits, "alpha"))
        assert _events(state_dir, "update.accepted") == []

        service.start()
        accepted = _events(state_dir, "update.accepted", round=0)
        envelope = signed_envelope(kits, "alpha", 0)
        retried = _upload(service.url, kits, "alpha")
        after_retry = _events(state_dir, "update.accepted", round=0)
    finally:
        service.stop()

    assert len(accepted) == 1
    assert accepted[0]["actor"] == "alpha"
    assert accepted[0]["details"]["sha256"] == hashlib.sha256(envelope).hexdigest()
    _assert_recovered(accepted[0])
    assert retried.status_code == 200, retried.text
    assert retried.json()["receipt"] == accepted[0]["details"]["receipt"]
    # The retry gets its own entry, and the upload is still recovered once.
    assert after_retry[0] == accepted[0]
    assert len(after_retry) == 2
    assert "recovered" not in after_retry[1]["details"]
    _assert_verifies(state_dir, kits)


def test_finalize_killed_before_audit_recovered(kits, tmp_path) -> None:
    state_dir = tmp_path / "state"
    service = ServiceProcess(state_dir, kits["aggregation"])
    service.start(environment={KILL_BEFORE_AUDIT_VARIABLE: "round.finalized"})
    try:
        _create_study(service.url, kits)
        _open_round(service.url, kits)
        for site in SITES:
            assert _upload(service.url, kits, site).status_code == 200
        _expect_killed(service, lambda: _finalize(service.url, kits))

        service.start()
        retried = _finalize(service.url, kits)
        with client(service.url, kits["coordinator"]) as coordinator:
            model = coordinator.get(f"/v1/studies/{STUDY}/models/1")
    finally:
        service.stop()

    assert retried.status_code == 200, retried.text
    assert retried.json()["state"] == "finalized"
    finalized = _events(state_dir, "round.finalized", round=0)
    registered = _events(state_dir, "model.registered", version=1)
    assert len(finalized) == 1
    assert finalized[0]["details"]["sites"] == list(SITES)
    _assert_recovered(finalized[0])
    assert len(registered) == 1
    assert registered[0]["details"]["round"] == 0
    assert registered[0]["details"]["sha256"] == model.headers["X-Medfed-Model-Sha256"]
    _assert_recovered(registered[0])
    assert registered[0]["seq"] == finalized[0]["seq"] + 1
    # The uploads were audited before the crash and are not written again.
    assert len(_events(state_dir, "update.accepted")) == len(SITES)
    _assert_verifies(state_dir, kits)


def test_async_publication_killed_recovered(kits, tmp_path) -> None:
    state_dir = tmp_path / "state"
    service = ServiceProcess(state_dir, kits["aggregation"])
    # The second arrival fills the buffer of two and publishes version 1.
    service.start(environment={KILL_BEFORE_AUDIT_VARIABLE: "update.accepted:2"})
    try:
        _create_study(
            service.url, kits, asynchronous={"buffer_size": 2, "max_versions": 5}
        )
        assert _upload_asynchronous(service.url, kits, "alpha").status_code == 200
        _expect_killed(service, lambda: _upload_asynchronous(service.url, kits, "beta"))

        service.start()
        retried = _upload_asynchronous(service.url, kits, "beta")
        with client(service.url, kits["coordinator"]) as coordinator:
            model = coordinator.get(f"/v1/studies/{STUDY}/models/1")
    finally:
        service.stop()

    assert retried.status_code == 200, retried.text
    assert retried.json()["duplicate"] is True
    arrivals = _events(state_dir, "update.accepted", base_version=0, duplicate=False)
    assert [entry["actor"] for entry in arrivals] == ["alpha", "beta"]
    assert "recovered" not in arrivals[0]["details"]
    _assert_recovered(arrivals[1])
    registered = _events(state_dir, "model.registered", version=1)
    assert len(registered) == 1
    assert registered[0]["details"]["sites"] == list(SITES)
    assert registered[0]["details"]["sha256"] == model.headers["X-Medfed-Model-Sha256"]
    _assert_recovered(registered[0])
    _assert_verifies(state_dir, kits)


def test_restart_without_crash_adds_nothing(kits, tmp_path) -> None:
    state_dir = tmp_path / "state"
    service = ServiceProcess(state_dir, kits["aggregation"]).start()
    try:
        _create_study(service.url, kits)
        _open_round(service.url, kits)
        assert _upload(service.url, kits, "alpha").status_code == 200
        service.kill()
        before = _entries(state_dir)
        service.start()
    finally:
        service.stop()

    after = _entries(state_dir)
    assert after[: len(before)] == before
    assert [entry["event"] for entry in after[len(before) :]] == ["service.started"]
    _assert_verifies(state_dir, kits)
