"""The key-exchange deadline of masking rounds on the real aggregation service.

The service runs as its own process on 127.0.0.1. One of four sites hangs
before it advertises or before it shares keys and is never withdrawn. With
``key_exchange_seconds`` of a few seconds and a round deadline of minutes,
the other three still finish the round long before the round deadline.
"""

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from medfed.contract.secagg import MaskingSite
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.errors import ServiceError
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient
from medfed.sites.secagg_client import MaskingClient

SITES = ["site-a", "site-b", "site-c", "site-d"]
HUNG = "site-d"
INITIAL = {"b": np.ones(3, np.float32), "w": np.zeros((2, 3), np.float32)}
# Advertising closes this long after the round opens, sharing this long
# after advertising closed.
KEY_EXCHANGE_SECONDS = 4.0
ROUND_DEADLINE_SECONDS = 300.0
SECURE = SecureAggregationConfig(
    mode="masking",
    fractional_bits=16,
    max_weight=100,
    key_exchange_seconds=KEY_EXCHANGE_SECONDS,
)
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalAggregationService]:
    with LocalAggregationService(
        tmp_path_factory.mktemp("aggregation"), max_upload_bytes=1_000_000
    ) as running:
        yield running


def create_study(client: AggregationClient) -> str:
    """Create a masking study; return its name."""
    name = f"kex-{next(_study_numbers)}"
    settings = {
        "sites": SITES,
        "strategy": "fedavg",
        "secure_aggregation": SECURE.model_dump(mode="json"),
    }
    body = save_safetensors(
        INITIAL, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    client.create_study(name, body)
    return name


def open_study(client: AggregationClient) -> str:
    """Create a masking study and open its round 0; return the study's name."""
    name = create_study(client)
    client.open_round(
        name, 0, sites=SITES, quorum=3, deadline_seconds=ROUND_DEADLINE_SECONDS
    )
    return name


def site_delta(index: int) -> dict[str, np.ndarray]:
    """Return multiples of 1/4, which 16 fractional bits encode exactly."""
    return {
        "b": np.full(3, 0.25 * index, np.float32),
        "w": np.full((2, 3), -0.25 * index, np.float32),
    }


def sample_count(index: int) -> int:
    return 10 * (index + 1)


def run_site(url: str, study: str, index: int, errors: dict) -> None:
    name = SITES[index]
    site = MaskingSite(
        site=name, study=study, round_number=0, encoding=SECURE.encoding(4)
    )
    with AggregationClient(url) as client:
        masking = MaskingClient(url, poll_interval=0.05)
        try:
            masking.run_round(
                site,
                site_delta(index),
                sample_count=sample_count(index),
                wait_seconds=60,
                upload=lambda envelope: client.upload(study, 0, name, envelope),
            )
        except Exception as error:  # reported by the test's assert
            errors[name] = error
        finally:
            masking.close()


def run_sites(url: str, study: str, names: list[str]) -> dict[str, Exception]:
    """Run the masking round of ``names`` in threads; return their errors."""
    errors: dict[str, Exception] = {}
    threads = [
        threading.Thread(target=run_site, args=(url, study, SITES.index(name), errors))
        for name in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def advertise(url: str, study: str, name: str) -> None:
    """Send ``name``'s key advertisement by hand; the site then hangs."""
    site = MaskingSite(
        site=name, study=study, round_number=0, encoding=SECURE.encoding(4)
    )
    response = httpx.post(
        f"{url}/v1/studies/{study}/rounds/0/secagg/keys",
        json=site.advertise().model_dump(mode="json"),
        trust_env=False,
    )
    assert response.status_code == 200, response.text


def roster_sites(url: str, study: str) -> list[str]:
    response = httpx.get(
        f"{url}/v1/studies/{study}/rounds/0/secagg/roster", trust_env=False
    )
    assert response.status_code == 200, response.text
    return [item["site"] for item in response.json()["advertisements"]]


def service_log(service: LocalAggregationService) -> str:
    return (service.state_dir / "service.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("hangs_before", ["advertising", "sharing"])
def test_hung_site_dropped_at_key_exchange(
    service: LocalAggregationService, hangs_before: str
) -> None:
    survivors = [name for name in SITES if name != HUNG]
    with AggregationClient(service.url) as client:
        study = open_study(client)
        started = time.monotonic()
        if hangs_before == "sharing":
            advertise(service.url, study, HUNG)
        errors = run_sites(service.url, study, survivors)
        # The service removes a masking round once it has unmasked it.
        roster = roster_sites(service.url, study)
        progress = client.round_status(study, 0)["masking"]
        status = client.finalize(study, 0, absent=[HUNG])
        elapsed = time.monotonic() - started
        model = client.download_model(study)
        unmasked_progress = client.round_status(study, 0)["masking"]

    assert errors == {}
    assert status["state"] == "finalized"
    assert sorted(status["uploaded"]) == survivors
    # Well before the round deadline: the round did not wait for the hung site.
    assert elapsed < ROUND_DEADLINE_SECONDS / 2
    expected_roster = survivors if hangs_before == "advertising" else SITES
    assert roster == expected_roster
    # The flow reads this to stop waiting for the hung site. It names sites only.
    assert progress == {
        "phase": "revealing",
        "reason": None,
        "advertised": expected_roster,
        "shared": survivors,
        "uploaded": survivors,
        "revealed": survivors,
        "withdrew": [],
    }
    assert unmasked_progress is None
    closed_phase = "advertising" if hangs_before == "advertising" else "sharing"
    assert (
        f"masking round 0 of study {study} closed {closed_phase} at its deadline "
        f"without sites {HUNG}"
    ) in service_log(service)
    # The exact weighted sum of the survivors, divided by their sample count.
    weights = {name: sample_count(SITES.index(name)) for name in survivors}
    total = sum(weights.values())
    mean = sum(0.25 * SITES.index(name) * weights[name] for name in survivors) / total
    np.testing.assert_allclose(model.weights["b"], 1.0 + mean, rtol=1e-6)
    np.testing.assert_allclose(model.weights["w"], -mean, rtol=1e-6)


def test_too_few_at_key_exchange_aborts(service: LocalAggregationService) -> None:
    with AggregationClient(service.url) as client:
        study = open_study(client)
        errors = run_sites(service.url, study, ["site-a", "site-b"])
        # Without ``absent``: the aborted masking round needs no waiting.
        progress = client.round_status(study, 0)["masking"]
        status = client.finalize(study, 0)
        latest = client.study_status(study)["latest_version"]

    assert sorted(errors) == ["site-a", "site-b"]
    assert progress["phase"] == "aborted"
    assert "advertising reached its deadline" in progress["reason"]
    for error in errors.values():
        assert isinstance(error, ServiceError)
        assert error.status_code == 409
        assert "advertising reached its deadline and could not close" in str(error)
    assert status["state"] == "aborted"
    assert "cannot start the round with 2 sites" in status["reason"]
    assert latest == 0


def test_round_shorter_than_key_exchange_rejected(
    service: LocalAggregationService,
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client)
        with pytest.raises(ServiceError) as rejected:
            client.open_round(study, 0, sites=SITES, quorum=3, deadline_seconds=2)
        opened = client.open_round(
            study, 0, sites=SITES, quorum=3, deadline_seconds=ROUND_DEADLINE_SECONDS
        )

    assert rejected.value.status_code == 422
    assert (
        "secure_aggregation.key_exchange_seconds is 4 s, above the round deadline "
        "of 2 s (round.deadline_seconds)"
    ) in str(rejected.value)
    assert opened["state"] == "open"


def test_restart_keeps_advertising_deadline(tmp_path: Path) -> None:
    with LocalAggregationService(
        tmp_path / "aggregation", max_upload_bytes=1_000_000
    ) as service:
        with AggregationClient(service.url) as client:
            study = open_study(client)
        opened = time.time()
        for name in SITES[:3]:
            advertise(service.url, study, name)
        assert service.process is not None
        service.process.kill()
        service.process.wait(timeout=30)
        service.process = None
        # Restart only after the saved advertising deadline has passed, so
        # the first poll closes advertising at once. A deadline counted again
        # from the restart would hold the phase open for seconds more.
        time.sleep(max(0.0, opened + KEY_EXCHANGE_SECONDS + 0.5 - time.time()))
        service.start()

        roster = roster_sites(service.url, study)
        late = httpx.post(
            f"{service.url}/v1/studies/{study}/rounds/0/secagg/keys",
            json=MaskingSite(
                site=HUNG, study=study, round_number=0, encoding=SECURE.encoding(4)
            )
            .advertise()
            .model_dump(mode="json"),
            trust_env=False,
        )

    assert roster == SITES[:3]
    assert late.status_code == 409
