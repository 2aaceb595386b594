"""Reconciling the audit log with the store when the service starts.

Changes are made through ``RoundService`` directly, which stores them
without audit entries, as a crash right after each commit would leave them.
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.audit import verify
from medfed.aggregation.rounds import RoundService
from medfed.aggregation.service import ServiceSettings, create_app
from medfed.contract.wire import encode_envelope

STUDY = "heart"
SITES = ["alpha", "beta"]
WEIGHTS = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}


@contextmanager
def started(state_dir: Path) -> Iterator[FastAPI]:
    """Build the service's app on ``state_dir`` (which reconciles), then close it."""
    app = create_app(ServiceSettings(state_dir=state_dir))
    try:
        yield app
    finally:
        app.state.security.close()
        app.state.service.store.close()


def entries(state_dir: Path) -> list[dict[str, Any]]:
    lines = (state_dir / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def store_changes_without_audit(service: RoundService) -> None:
    """Create a study, open round 0 and accept one upload, with no audit entries."""
    settings = {"sites": SITES, "strategy": "fedavg"}
    service.create_study(
        STUDY,
        save_safetensors(
            WEIGHTS, metadata={"medfed_study_settings": json.dumps(settings)}
        ),
    )
    service.open_round(STUDY, 0, sites=SITES, quorum=2, deadline_seconds=600)
    envelope = encode_envelope(
        {"w": np.full((2, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)},
        study=STUDY,
        round_number=0,
        site="alpha",
        sample_count=10,
        nonce="00000000000000a1",
    )
    service.accept_upload(STUDY, 0, "alpha", envelope)


def recovered(log: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (entry["event"], entry["actor"])
        for entry in log
        if entry["details"].get("recovered") is True
    ]


EXPECTED = [
    ("model.registered", "coordinator"),
    ("round.opened", "coordinator"),
    ("update.accepted", "alpha"),
]


def test_recovery_appends_missing_entries(tmp_path: Path) -> None:
    with started(tmp_path) as app:
        store_changes_without_audit(app.state.service)
    assert recovered(entries(tmp_path)) == []

    with started(tmp_path):
        pass

    log = entries(tmp_path)
    assert recovered(log) == EXPECTED
    assert [entry["event"] for entry in log[:2]] == ["service.started"] * 2
    upload = log[-1]["details"]
    assert upload["study"] == STUDY
    assert upload["round"] == 0
    assert upload["sample_count"] == 10
    assert upload["receipt"] == upload["sha256"][:32]
    assert upload["stored_at"] <= log[-1]["time"]
    opened = log[-2]["details"]
    assert opened["sites"] == SITES
    assert opened["quorum"] == 2
    assert abs(opened["deadline_seconds"] - 600) < 1
    assert verify(tmp_path / "audit.jsonl").ok


def test_second_restart_adds_nothing(tmp_path: Path) -> None:
    with started(tmp_path) as app:
        store_changes_without_audit(app.state.service)
    with started(tmp_path):
        pass
    before = entries(tmp_path)

    with started(tmp_path):
        pass
    with started(tmp_path):
        pass

    after = entries(tmp_path)
    assert after[: len(before)] == before
    added = [entry["event"] for entry in after[len(before) :]]
    assert added == ["service.started", "service.started"]
    assert verify(tmp_path / "audit.jsonl").ok


def test_entries_after_checkpoint_read(tmp_path: Path) -> None:
    """An entry appended while serving is found in the log's tail at the next start."""
    with started(tmp_path):
        pass
    with started(tmp_path) as app:
        store_changes_without_audit(app.state.service)
        app.state.security.record(
            "round.opened", "coordinator", {"study": STUDY, "round": 0}
        )

    with started(tmp_path):
        pass

    assert recovered(entries(tmp_path)) == [EXPECTED[0], EXPECTED[2]]


def test_new_log_lists_every_stored_change(tmp_path: Path) -> None:
    with started(tmp_path) as app:
        store_changes_without_audit(app.state.service)
    with started(tmp_path):
        pass
    # An operator keeps a broken log as evidence and starts a new one: the
    # new log no longer continues the chain that the store indexed.
    (tmp_path / "audit.jsonl").rename(tmp_path / "audit.jsonl.evidence")

    with started(tmp_path):
        pass
    with started(tmp_path):
        pass

    log = entries(tmp_path)
    assert recovered(log) == EXPECTED
    assert [entry["event"] for entry in log].count("service.started") == 2
    assert verify(tmp_path / "audit.jsonl").ok
