"""Asynchronous studies on the aggregation service over real HTTP (uvicorn)."""

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from medfed.contract.wire import encode_envelope
from medfed.errors import ServiceError
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient

SITES = ["site-a", "site-b", "site-c"]
INITIAL = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aggregation")


@pytest.fixture(scope="module")
def service(state_dir: Path) -> Iterator[LocalAggregationService]:
    with LocalAggregationService(state_dir, max_upload_bytes=200_000) as running:
        yield running


@pytest.fixture
def client(service: LocalAggregationService) -> Iterator[AggregationClient]:
    with AggregationClient(service.url) as created:
        yield created


def create_study(client: AggregationClient, **asynchronous: Any) -> str:
    name = f"async-{next(_study_numbers)}"
    settings = {
        "sites": SITES,
        "strategy": "fedavg",
        "asynchronous": {"buffer_size": 2, "max_versions": 10, **asynchronous},
    }
    client.create_study(
        name,
        save_safetensors(
            INITIAL, metadata={"medfed_study_settings": json.dumps(settings)}
        ),
    )
    return name


def envelope(
    study: str, site: str, value: float, base_version: int, sample_count: int = 10
) -> bytes:
    return encode_envelope(
        {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)},
        study=study,
        round_number=base_version,
        site=site,
        sample_count=sample_count,
        nonce=hashlib.sha256(f"{site}{value}{base_version}".encode()).hexdigest()[:32],
    )


def upload(
    client: AggregationClient,
    study: str,
    site: str,
    value: float,
    base_version: int,
    sample_count: int = 10,
) -> dict[str, Any]:
    body = envelope(study, site, value, base_version, sample_count)
    return client.upload_asynchronous(study, base_version, site, body)


def audit_events(state_dir: Path, study: str) -> list[dict[str, Any]]:
    lines = (state_dir / "audit.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    return [e for e in events if e.get("details", {}).get("study") == study]


def test_buffer_publishes_staleness_scaled_version(client: AggregationClient) -> None:
    study = create_study(client)

    first = upload(client, study, "site-a", 1.0, 0, sample_count=10)
    second = upload(client, study, "site-b", 4.0, 0, sample_count=30)
    # site-c trained from version 0 but arrives at version 1: staleness 1.
    third = upload(client, study, "site-c", -2.0, 0, sample_count=20)
    fourth = upload(client, study, "site-a", 2.0, 1, sample_count=10)

    assert first["published_version"] is None
    assert second["published_version"] == 1
    assert third["staleness"] == 1
    assert third["published_version"] is None
    assert fourth["staleness"] == 0
    assert fourth["published_version"] == 2
    version_1 = client.download_model(study, 1).weights
    # (1 * 10 + 4 * 30) / 40 = 3.25 added to w = 0 and b = 1.
    np.testing.assert_allclose(version_1["w"], np.full((2, 3), 3.25), rtol=1e-6)
    np.testing.assert_allclose(version_1["b"], np.full(3, 4.25), rtol=1e-6)
    latest = client.download_model(study, None)
    # (-2 / sqrt(2) * 20 + 2 * 10) / 30, the stale delta scaled by 1 / sqrt(1 + 1).
    step = (-2.0 / math.sqrt(2.0) * 20 + 2.0 * 10) / 30
    assert latest.version == 2
    np.testing.assert_allclose(
        latest.weights["w"], np.full((2, 3), 3.25 + step), rtol=1e-6
    )
    np.testing.assert_allclose(latest.weights["b"], np.full(3, 4.25 + step), rtol=1e-6)


def test_staleness_exponent_zero_keeps_full_delta(client: AggregationClient) -> None:
    study = create_study(client, staleness_exponent=0.0)
    upload(client, study, "site-a", 1.0, 0)
    upload(client, study, "site-b", 1.0, 0)
    upload(client, study, "site-c", 3.0, 0)
    upload(client, study, "site-a", 1.0, 1)

    latest = client.download_model(study, None)

    # Version 1 is w = 1; version 2 adds (3 + 1) / 2 unscaled.
    np.testing.assert_allclose(latest.weights["w"], np.full((2, 3), 3.0), rtol=1e-6)


def test_too_stale_update_rejected(client: AggregationClient, state_dir: Path) -> None:
    study = create_study(client, max_staleness=0)
    upload(client, study, "site-a", 1.0, 0)
    upload(client, study, "site-b", 1.0, 0)
    before = client.asynchronous_status(study)

    with pytest.raises(ServiceError) as raised:
        upload(client, study, "site-c", 1.0, 0)

    assert raised.value.status_code == 409
    assert "is 1 versions stale, more than max_staleness 0" in str(raised.value)
    after = client.asynchronous_status(study)
    assert after == before
    rejected = [
        e for e in audit_events(state_dir, study) if e["event"] == "update.rejected"
    ]
    assert len(rejected) == 1
    assert rejected[0]["actor"] == "site-c"


def test_retry_counts_once(client: AggregationClient) -> None:
    study = create_study(client)
    body = envelope(study, "site-a", 1.0, 0)

    first = client.upload_asynchronous(study, 0, "site-a", body)
    second = client.upload_asynchronous(study, 0, "site-a", body)

    assert second["receipt"] == first["receipt"]
    assert second["duplicate"] is True
    status = client.asynchronous_status(study)
    assert status["buffered"] == 1
    assert status["latest_version"] == 0
    with pytest.raises(ServiceError) as raised:
        upload(client, study, "site-a", 5.0, 0)
    assert raised.value.status_code == 409
    assert "already uploaded a different update trained from version 0" in str(
        raised.value
    )


def test_retry_after_publication_counts_once(client: AggregationClient) -> None:
    study = create_study(client)
    body = envelope(study, "site-a", 1.0, 0)
    client.upload_asynchronous(study, 0, "site-a", body)
    upload(client, study, "site-b", 1.0, 0)

    again = client.upload_asynchronous(study, 0, "site-a", body)

    assert again["aggregated_version"] == 1
    assert again["published_version"] is None
    status = client.asynchronous_status(study)
    assert status["latest_version"] == 1
    assert status["buffered"] == 0
    assert len(status["arrivals"]) == 2


@pytest.mark.parametrize(
    ("site", "base_version", "body_site", "status_code", "message"),
    [
        ("site-z", 0, "site-z", 403, "site 'site-z' does not take part"),
        ("site-a", 5, "site-a", 409, "version 5 of study"),
        ("site-a", 0, "site-b", 422, "envelope site is 'site-b'"),
    ],
)
def test_invalid_upload_changes_nothing(
    client: AggregationClient,
    site: str,
    base_version: int,
    body_site: str,
    status_code: int,
    message: str,
) -> None:
    study = create_study(client)
    upload(client, study, "site-b", 1.0, 0)
    before = client.asynchronous_status(study)
    body = envelope(study, body_site, 1.0, base_version)

    with pytest.raises(ServiceError) as raised:
        client.upload_asynchronous(study, base_version, site, body)

    assert raised.value.status_code == status_code
    assert message in str(raised.value)
    assert client.asynchronous_status(study) == before


def test_finished_study_takes_no_updates(client: AggregationClient) -> None:
    study = create_study(client, max_versions=1)
    upload(client, study, "site-a", 1.0, 0)
    upload(client, study, "site-b", 1.0, 0)

    with pytest.raises(ServiceError) as raised:
        upload(client, study, "site-c", 1.0, 0)

    assert raised.value.status_code == 409
    assert "has published all 1 versions" in str(raised.value)
    assert client.asynchronous_status(study)["finished"] is True


def test_rounds_rejected_in_async_study(client: AggregationClient) -> None:
    study = create_study(client)

    with pytest.raises(ServiceError) as raised:
        client.open_round(study, 0, sites=SITES, quorum=2, deadline_seconds=60)

    assert raised.value.status_code == 409
    assert "is asynchronous and has no rounds" in str(raised.value)


def test_round_upload_rejected_in_async_study(client: AggregationClient) -> None:
    study = create_study(client)
    before = client.asynchronous_status(study)

    with pytest.raises(ServiceError) as raised:
        client.upload(study, 0, "site-a", envelope(study, "site-a", 1.0, 0))

    assert raised.value.status_code == 409
    assert "is asynchronous and has no rounds" in str(raised.value)
    assert "/asynchronous/{base_version}/updates/{site}" in str(raised.value)
    assert client.asynchronous_status(study) == before


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"asynchronous": {"buffer_size": 4, "max_versions": 2}},
            "exceeds the 3 sites",
        ),
        ({"strategy": "scaffold"}, "scaffold updates its control variates"),
        ({"secure_aggregation": {"mode": "masking"}}, "need secure_aggregation 'none'"),
        (
            {"wrappers": [["krum", {"f": 1}]]},
            "krum with f=1 needs at least 3 updates per version",
        ),
    ],
)
def test_async_study_settings_rejected(
    service: LocalAggregationService, changes: dict[str, Any], message: str
) -> None:
    settings = {
        "sites": SITES,
        "strategy": "fedavg",
        "asynchronous": {"buffer_size": 2, "max_versions": 2},
        **changes,
    }
    body = save_safetensors(
        INITIAL, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    name = f"async-{next(_study_numbers)}"

    response = httpx.post(f"{service.url}/v1/studies/{name}", content=body)

    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert httpx.get(f"{service.url}/v1/studies/{name}").status_code == 404


def test_audit_records_arrivals_and_publication(
    client: AggregationClient, state_dir: Path
) -> None:
    study = create_study(client)
    upload(client, study, "site-a", 1.0, 0)
    upload(client, study, "site-b", 1.0, 0)

    events = audit_events(state_dir, study)

    accepted = [e for e in events if e["event"] == "update.accepted"]
    registered = [e for e in events if e["event"] == "model.registered"]
    assert [e["actor"] for e in accepted] == ["site-a", "site-b"]
    assert accepted[0]["details"]["base_version"] == 0
    assert accepted[0]["details"]["staleness"] == 0
    assert [e["details"].get("version") for e in registered] == [0, 1]
    assert registered[1]["details"]["sites"] == ["site-a", "site-b"]


def test_repeated_creation_marked_duplicate(
    client: AggregationClient, state_dir: Path
) -> None:
    # A resumed study creates its study again; version 0 is registered once.
    study = create_study(client)
    settings = {
        "sites": SITES,
        "strategy": "fedavg",
        "asynchronous": {"buffer_size": 2, "max_versions": 10},
    }
    again = client.create_study(
        study,
        save_safetensors(
            INITIAL, metadata={"medfed_study_settings": json.dumps(settings)}
        ),
    )

    events = audit_events(state_dir, study)

    registered = [e for e in events if e["event"] == "model.registered"]
    assert again["version"] == 0
    assert [e["details"]["version"] for e in registered] == [0, 0]
    assert [e["details"]["duplicate"] for e in registered] == [False, True]
    assert registered[0]["details"]["sha256"] == registered[1]["details"]["sha256"]


def test_buffer_survives_restart(tmp_path: Path) -> None:
    state = tmp_path / "aggregation"
    with (
        LocalAggregationService(state, max_upload_bytes=200_000) as first,
        AggregationClient(first.url) as client,
    ):
        study = create_study(client)
        body = envelope(study, "site-a", 1.0, 0, sample_count=10)
        receipt = client.upload_asynchronous(study, 0, "site-a", body)

    with (
        LocalAggregationService(state, max_upload_bytes=200_000) as second,
        AggregationClient(second.url) as client,
    ):
        retried = client.upload_asynchronous(study, 0, "site-a", body)
        buffered = client.asynchronous_status(study)["buffered"]
        published = upload(client, study, "site-b", 3.0, 0, sample_count=10)
        latest = client.download_model(study, None)

    assert retried["receipt"] == receipt["receipt"]
    assert buffered == 1
    assert published["published_version"] == 1
    # (1 * 10 + 3 * 10) / 20 = 2: both arrivals, each counted once.
    np.testing.assert_allclose(latest.weights["w"], np.full((2, 3), 2.0), rtol=1e-6)


@pytest.mark.parametrize(
    "body",
    [
        b'{"status": "spent", "epsilon_spent": NaN}',
        b'{"status": "spent", "delta": Infinity}',
        b'{"epsilon_spent": NaN}',
    ],
)
def test_non_finite_privacy_report_rejected(
    service: LocalAggregationService, client: AggregationClient, body: bytes
) -> None:
    study = create_study(client)

    response = httpx.post(
        f"{service.url}/v1/studies/{study}/asynchronous/privacy/site-a",
        content=body,
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list)
    assert detail[0]["loc"][0] == "body"
