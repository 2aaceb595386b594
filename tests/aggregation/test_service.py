"""The aggregation service over real HTTP: uvicorn on 127.0.0.1."""

import hashlib
import itertools
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.contract.wire import encode_envelope, read_header
from medfed.errors import ServiceError
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient

SITES = ["site-a", "site-b", "site-c"]
INITIAL = {"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)}
MAX_UPLOAD_BYTES = 200_000
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalAggregationService]:
    with LocalAggregationService(
        tmp_path_factory.mktemp("aggregation"), max_upload_bytes=MAX_UPLOAD_BYTES
    ) as running:
        yield running


@pytest.fixture
def client(service: LocalAggregationService) -> Iterator[AggregationClient]:
    with AggregationClient(service.url) as created:
        yield created


@pytest.fixture
def study(client: AggregationClient) -> str:
    """A new study with round 0 open for every site."""
    name = f"study-{next(_study_numbers)}"
    settings = json.dumps({"sites": SITES, "strategy": "fedavg"})
    client.create_study(
        name, save_safetensors(INITIAL, metadata={"medfed_study_settings": settings})
    )
    client.open_round(name, 0, sites=SITES, quorum=2, deadline_seconds=600)
    return name


def envelope(
    study: str, site: str, value: float, *, round_number: int = 0, **overrides: object
) -> bytes:
    update = {
        "w": np.full((2, 3), value, np.float32),
        "b": np.full(3, value, np.float32),
    }
    update.update(overrides.pop("update", {}))  # type: ignore[call-overload]
    arguments: dict[str, object] = {
        "study": study,
        "round_number": round_number,
        "site": site,
        "sample_count": 10,
        "nonce": hashlib.sha256(f"{site}{value}".encode()).hexdigest()[:32],
    }
    arguments.update(overrides)
    return encode_envelope(update, **arguments)  # type: ignore[arg-type]


def put(
    service: LocalAggregationService,
    study: str,
    site: str,
    body: bytes,
    round_number: int = 0,
) -> httpx.Response:
    return httpx.put(
        f"{service.url}/v1/studies/{study}/rounds/{round_number}/updates/{site}",
        content=body,
    )


def test_round_aggregates_sample_weighted(
    client: AggregationClient, study: str
) -> None:
    client.upload(study, 0, "site-a", envelope(study, "site-a", 1.0, sample_count=10))
    client.upload(study, 0, "site-b", envelope(study, "site-b", 4.0, sample_count=30))
    client.upload(study, 0, "site-c", envelope(study, "site-c", -2.0, sample_count=20))

    status = client.finalize(study, 0)
    model = client.download_model(study, status["result_version"])

    # (1 * 10 + 4 * 30 - 2 * 20) / 60 = 1.5
    np.testing.assert_allclose(model.weights["w"], np.full((2, 3), 1.5))
    np.testing.assert_allclose(model.weights["b"], np.full(3, 2.5))
    assert status["state"] == "finalized"
    assert status["result_version"] == 1


def test_model_versions_keep_content_hash(
    client: AggregationClient, study: str
) -> None:
    first = client.download_model(study, 0)
    raw = httpx.get(f"{client.base_url}/v1/studies/{study}/models/0").content

    assert first.sha256 == hashlib.sha256(raw).hexdigest()
    assert first.version == 0


def test_duplicate_upload_returns_same_receipt(
    client: AggregationClient, study: str
) -> None:
    body = envelope(study, "site-a", 1.0)
    first = client.upload(study, 0, "site-a", body)
    second = client.upload(study, 0, "site-a", body)

    assert first["receipt"] == second["receipt"]
    assert client.round_status(study, 0)["uploaded"] == ["site-a"]


# Each rejection: (description, how to build the request, status, message part).
def _rejections(study: str) -> list[tuple[str, str, bytes, int, str]]:
    nan_update = {"b": np.array([0.0, np.nan, 0.0], np.float32)}
    return [
        (
            "unknown site",
            "site-z",
            envelope(study, "site-z", 1.0),
            403,
            "site 'site-z' does not take part in round 0",
        ),
        (
            "garbage body",
            "site-b",
            b"not an envelope at all",
            400,
            "this is not a medfed update",
        ),
        ("empty body", "site-b", b"", 400, "envelope is truncated"),
        (
            "site mismatch",
            "site-b",
            envelope(study, "site-c", 1.0),
            422,
            "envelope site is 'site-c' but the request is for 'site-b'",
        ),
        (
            "study mismatch",
            "site-b",
            envelope("other-study", "site-b", 1.0),
            422,
            "envelope study is 'other-study'",
        ),
        (
            "round mismatch",
            "site-b",
            envelope(study, "site-b", 1.0, round_number=3),
            422,
            "envelope round is 3",
        ),
        (
            "missing tensor",
            "site-b",
            encode_envelope(
                {"w": np.zeros((2, 3), np.float32)},
                study=study,
                round_number=0,
                site="site-b",
                sample_count=5,
                nonce="ab" * 16,
            ),
            422,
            "missing ['b']",
        ),
        (
            "extra tensor",
            "site-b",
            envelope(study, "site-b", 1.0, update={"x": np.zeros(1, np.float32)}),
            422,
            "unexpected ['x']",
        ),
        (
            "wrong shape",
            "site-b",
            envelope(study, "site-b", 1.0, update={"b": np.zeros(4, np.float32)}),
            422,
            "update tensor 'b' has shape [4], expected [3]",
        ),
        (
            "non-finite value",
            "site-b",
            envelope(study, "site-b", 1.0, update=nan_update),
            400,
            "tensor 'b' contains NaN or infinite values",
        ),
        (
            "oversized body",
            "site-b",
            b"\0" * (MAX_UPLOAD_BYTES + 1),
            413,
            f"exceeds the limit of {MAX_UPLOAD_BYTES} bytes",
        ),
    ]


@pytest.mark.parametrize("case", range(11))
def test_rejected_upload_changes_nothing(
    service: LocalAggregationService, client: AggregationClient, study: str, case: int
) -> None:
    accepted = envelope(study, "site-a", 2.0)
    client.upload(study, 0, "site-a", accepted)
    before = client.round_status(study, 0)
    description, site, body, status_code, message = _rejections(study)[case]

    response = put(service, study, site, body)

    assert response.status_code == status_code, description
    assert message in response.json()["detail"], description
    after = client.round_status(study, 0)
    assert after["uploaded"] == before["uploaded"] == ["site-a"]
    # The accepted upload still counts once and alone.
    client.upload(study, 0, "site-b", envelope(study, "site-b", 4.0))
    final = client.finalize(study, 0, absent=["site-c"])
    weights = client.download_model(study, final["result_version"]).weights
    np.testing.assert_allclose(weights["w"], np.full((2, 3), 3.0))


def test_zero_sample_count_is_rejected(
    service: LocalAggregationService, study: str
) -> None:
    body = envelope(study, "site-a", 1.0)
    header, payload = read_header(body)
    fields = header.model_dump(mode="json", exclude_none=True) | {"sample_count": 0}
    header_bytes = json.dumps(fields).encode()
    tampered = (
        b"MFED"
        + bytes([1])
        + struct.pack(">I", len(header_bytes))
        + header_bytes
        + bytes(payload)
    )

    response = put(service, study, "site-a", tampered)

    assert response.status_code == 400
    assert "sample_count: Input should be greater than 0" in response.json()["detail"]


def test_conflicting_upload_gets_409(client: AggregationClient, study: str) -> None:
    client.upload(study, 0, "site-a", envelope(study, "site-a", 1.0))

    with pytest.raises(ServiceError) as raised:
        client.upload(study, 0, "site-a", envelope(study, "site-a", 9.0))

    assert raised.value.status_code == 409
    assert "already uploaded a different update for round 0" in str(raised.value)


def test_closed_and_future_rounds_reject_uploads(
    client: AggregationClient, study: str
) -> None:
    client.upload(study, 0, "site-a", envelope(study, "site-a", 1.0))
    client.upload(study, 0, "site-b", envelope(study, "site-b", 1.0))
    client.finalize(study, 0, absent=["site-c"])

    with pytest.raises(ServiceError) as closed:
        client.upload(study, 0, "site-c", envelope(study, "site-c", 1.0))
    with pytest.raises(ServiceError) as future:
        client.upload(
            study, 1, "site-c", envelope(study, "site-c", 1.0, round_number=1)
        )

    assert closed.value.status_code == 409
    assert "round 0 of study" in str(closed.value)
    assert "is finalized; uploads are closed" in str(closed.value)
    assert future.value.status_code == 404
    assert "round 1 of study" in str(future.value)


def test_finalize_waits_for_missing_sites(
    client: AggregationClient, study: str
) -> None:
    client.upload(study, 0, "site-a", envelope(study, "site-a", 1.0))

    with pytest.raises(ServiceError) as raised:
        client.finalize(study, 0)

    assert raised.value.status_code == 409
    assert "still waits for sites site-b, site-c" in str(raised.value)
    assert client.round_status(study, 0)["state"] == "open"


def test_round_below_quorum_aborts_and_keeps_model(
    client: AggregationClient, study: str
) -> None:
    client.upload(study, 0, "site-a", envelope(study, "site-a", 1.0))

    status = client.finalize(study, 0, absent=["site-b", "site-c"])

    assert status["state"] == "aborted"
    assert "has 1 updates, fewer than its quorum of 2" in status["reason"]
    assert client.download_model(study).version == 0


def test_no_route_returns_an_upload(
    service: LocalAggregationService, client: AggregationClient, study: str
) -> None:
    body = envelope(study, "site-a", 7.0)
    client.upload(study, 0, "site-a", body)
    routes = httpx.get(f"{service.url}/openapi.json").json()["paths"]

    get_routes = [path for path, methods in routes.items() if "get" in methods]
    for path in get_routes:
        filled = (
            path.replace("{study}", study)
            .replace("{round_number}", "0")
            .replace("{version}", "0")
        )
        response = httpx.get(f"{service.url}{filled}")
        assert body not in response.content, path
    assert client.round_status(study, 0)["uploaded"] == ["site-a"]


def test_unknown_study_is_404(service: LocalAggregationService) -> None:
    response = httpx.get(f"{service.url}/v1/studies/nothing-here/models/latest")

    assert response.status_code == 404
    assert (
        response.json()["detail"] == "study 'nothing-here' not found; create it first"
    )


def test_invalid_identifier_in_path_is_422(
    service: LocalAggregationService, study: str
) -> None:
    response = put(service, study, "Site..A", envelope(study, "site-a", 1.0))

    assert response.status_code == 422


def test_state_survives_restart(tmp_path: Path) -> None:
    with (
        LocalAggregationService(tmp_path, max_upload_bytes=MAX_UPLOAD_BYTES) as first,
        AggregationClient(first.url) as client,
    ):
        settings = json.dumps({"sites": SITES, "strategy": "fedavg"})
        client.create_study(
            "durable",
            save_safetensors(INITIAL, metadata={"medfed_study_settings": settings}),
        )
        client.open_round("durable", 0, sites=SITES, quorum=2, deadline_seconds=600)
        client.upload("durable", 0, "site-a", envelope("durable", "site-a", 1.0))
    with (
        LocalAggregationService(tmp_path, max_upload_bytes=MAX_UPLOAD_BYTES) as second,
        AggregationClient(second.url) as client,
    ):
        assert client.round_status("durable", 0)["uploaded"] == ["site-a"]
        client.upload("durable", 0, "site-b", envelope("durable", "site-b", 3.0))
        status = client.finalize("durable", 0, absent=["site-c"])
        weights = load_safetensors(
            httpx.get(f"{second.url}/v1/studies/durable/models/1").content
        )
    assert status["state"] == "finalized"
    np.testing.assert_allclose(weights["w"], np.full((2, 3), 2.0))


def audit_events(service: LocalAggregationService, event: str) -> list[dict]:
    log = service.state_dir / "audit.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [entry for entry in entries if entry["event"] == event]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"status": "spent", "epsilon_spent": NaN, "delta": 0.001}', "epsilon_spent"),
        (
            '{"status": "spent", "epsilon_spent": Infinity, "delta": 0.001}',
            "epsilon_spent",
        ),
        (
            '{"status": "spent", "epsilon_spent": 1e999, "delta": 0.001}',
            "epsilon_spent",
        ),
        ('{"status": "spent", "epsilon_spent": -0.5, "delta": 0.001}', "epsilon_spent"),
        (
            '{"status": "spent", "epsilon_spent": "0.5", "delta": 0.001}',
            "epsilon_spent",
        ),
        ('{"status": "spent", "epsilon_spent": 0.5, "delta": 0}', "delta"),
        ('{"status": "spent", "epsilon_spent": 0.5, "delta": 1.5}', "delta"),
        ('{"status": "spent", "delta": 0.001}', "needs epsilon_spent and delta"),
        ('{"status": "spent", "epsilon_spent": 0.5}', "needs epsilon_spent and delta"),
        ('{"status": "released", "epsilon_spent": 0.5, "delta": 0.001}', "status"),
    ],
)
def test_invalid_privacy_report_rejected(
    service: LocalAggregationService, study: str, body: str, field: str
) -> None:
    recorded = len(audit_events(service, "privacy.spent"))

    response = httpx.post(
        f"{service.url}/v1/studies/{study}/rounds/0/privacy/site-a",
        content=body,
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 422
    assert field in response.text
    assert len(audit_events(service, "privacy.spent")) == recorded


def test_large_privacy_report_recorded(
    service: LocalAggregationService, study: str, client: AggregationClient
) -> None:
    # The service records what a site reports and does not know its budget,
    # so an epsilon far over any budget is kept as evidence, not dropped.
    client.report_privacy(
        study, 0, "site-a", status="spent", epsilon_spent=1e300, delta=1e-3
    )

    spent = [
        entry
        for entry in audit_events(service, "privacy.spent")
        if entry["details"]["study"] == study
    ]
    assert len(spent) == 1
    assert spent[0]["details"]["epsilon_spent"] == 1e300
