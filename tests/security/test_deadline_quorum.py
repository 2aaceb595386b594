"""Round deadlines and quorum on the running service over mutual TLS."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from medfed.aggregation.service import ServiceSettings, create_app
from medfed.provision import provision

from .conftest import study_config_text
from .federation import (
    STUDY,
    client,
    initial_model,
    signed_envelope,
    site_delta,
    upload_path,
)
from .servers import serve

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")
DEADLINE_SECONDS = 2.0


@pytest.fixture(scope="module")
def five_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    folder = tmp_path_factory.mktemp("five")
    config = folder / "study.yaml"
    config.write_text(
        study_config_text(
            study=STUDY, sites="[" + ", ".join(f"{{id: {s}}}" for s in SITES) + "]"
        )
    )
    kits = provision(config, folder / "kits")
    app = create_app(
        ServiceSettings(state_dir=folder / "state", kit_dir=kits["aggregation"])
    )
    with serve(app, **app.state.security.uvicorn_options()) as url:
        with client(url, kits["coordinator"]) as coordinator:
            _, body = initial_model(SITES)
            assert (
                coordinator.post(f"/v1/studies/{STUDY}", content=body).status_code
                == 201
            )
        yield {"url": url, "kits": kits, "audit": folder / "state" / "audit.jsonl"}


def open_round(federation: dict, round_number: int) -> None:
    with client(federation["url"], federation["kits"]["coordinator"]) as coordinator:
        response = coordinator.post(
            f"/v1/studies/{STUDY}/rounds/{round_number}",
            json={
                "sites": list(SITES),
                "quorum": 3,
                "deadline_seconds": DEADLINE_SECONDS,
            },
        )
    assert response.status_code == 200, response.text


def upload(federation: dict, site: str, round_number: int) -> None:
    kits = federation["kits"]
    with client(federation["url"], kits[f"site-{site}"]) as connection:
        response = connection.put(
            upload_path(round_number, site),
            content=signed_envelope(kits, site, round_number),
        )
    assert response.status_code == 200, response.text


def finalize(federation: dict, round_number: int) -> tuple[int, dict]:
    with client(federation["url"], federation["kits"]["coordinator"]) as coordinator:
        response = coordinator.post(
            f"/v1/studies/{STUDY}/rounds/{round_number}/finalize", json={}
        )
    return response.status_code, response.json()


def audit_events(federation: dict, event: str) -> list[dict]:
    lines = federation["audit"].read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    return [entry for entry in entries if entry["event"] == event]


def latest_model(federation: dict) -> tuple[int, dict[str, np.ndarray]]:
    with client(federation["url"], federation["kits"]["coordinator"]) as coordinator:
        response = coordinator.get(f"/v1/studies/{STUDY}/models/latest")
    return int(response.headers["X-Medfed-Model-Version"]), load_safetensors(
        response.content
    )


def test_silent_sites_close_at_deadline(five_sites: dict) -> None:
    open_round(five_sites, 0)
    version_before, weights_before = latest_model(five_sites)
    for site in SITES[:3]:
        upload(five_sites, site, 0)

    early_status, early = finalize(five_sites, 0)
    time.sleep(DEADLINE_SECONDS + 0.5)
    status, body = finalize(five_sites, 0)
    version, weights = latest_model(five_sites)

    assert early_status == 409
    assert "still waits for sites site-d, site-e" in early["detail"]
    assert status == 200
    assert body["state"] == "finalized"
    assert body["uploaded"] == list(SITES[:3])
    assert version == version_before + 1
    finalized = audit_events(five_sites, "round.finalized")
    assert finalized[-1]["details"] == {
        "study": STUDY,
        "round": 0,
        "sites": list(SITES[:3]),
    }
    counts = {site: 10 + sum(site.encode()) % 50 for site in SITES[:3]}
    expected = sum(
        site_delta(s, 0)["linear.bias"] * n for s, n in counts.items()
    ) / sum(counts.values())
    np.testing.assert_allclose(
        weights["linear.bias"], weights_before["linear.bias"] + expected, rtol=1e-5
    )


def test_two_responders_abort_round(five_sites: dict) -> None:
    open_round(five_sites, 1)
    version_before, weights_before = latest_model(five_sites)
    for site in SITES[:2]:
        upload(five_sites, site, 1)

    time.sleep(DEADLINE_SECONDS + 0.5)
    status, body = finalize(five_sites, 1)
    version, weights = latest_model(five_sites)

    assert status == 200
    assert body["state"] == "aborted"
    assert "has 2 updates, fewer than its quorum of 3" in body["reason"]
    assert version == version_before
    aborted = audit_events(five_sites, "round.aborted")
    assert aborted[-1]["details"]["round"] == 1
    assert "fewer than its quorum of 3" in aborted[-1]["details"]["reason"]
    for name, value in weights_before.items():
        np.testing.assert_array_equal(weights[name], value)


def test_late_upload_after_close_rejected(five_sites: dict, tmp_path: Path) -> None:
    kits = five_sites["kits"]
    with client(five_sites["url"], kits["site-site-e"]) as connection:
        response = connection.put(
            upload_path(0, "site-e"), content=signed_envelope(kits, "site-e", 0)
        )

    assert response.status_code == 409
    assert "is finalized; uploads are closed" in response.json()["detail"]
