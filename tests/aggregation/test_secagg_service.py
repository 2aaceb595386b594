"""Masking studies on the real aggregation service (uvicorn on 127.0.0.1)."""

import itertools
import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.limits import SHUTDOWN_GRACE_SECONDS
from medfed.contract.codecs import get_codec
from medfed.contract.secagg import Int8RingEncoding, MaskingSite
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.wire import encode_envelope
from medfed.errors import ServiceError
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient
from medfed.sites.secagg_client import MaskingClient

SITES = ["site-a", "site-b", "site-c", "site-d"]
INITIAL = {"b": np.ones(3, np.float32), "w": np.zeros((2, 3), np.float32)}
SECURE = SecureAggregationConfig(mode="masking", fractional_bits=16, max_weight=100)
# A power-of-two scale puts multiples of 1/64 exactly on int8 levels.
INT8_SCALE = 1 / 64
INT8_COMPRESSION = {"codec": "int8", "params": {"scale": INT8_SCALE}}
SECURE_INT8 = SecureAggregationConfig(
    mode="masking", clip=127 * INT8_SCALE, max_weight=100
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


def create_study(
    client: AggregationClient, secure: str | dict, compression: dict | None = None
) -> str:
    name = f"masked-{next(_study_numbers)}"
    settings = {"sites": SITES, "strategy": "fedavg", "secure_aggregation": secure}
    if compression is not None:
        settings["compression"] = compression
    settings = json.dumps(settings)
    client.create_study(
        name, save_safetensors(INITIAL, metadata={"medfed_study_settings": settings})
    )
    client.open_round(name, 0, sites=SITES, quorum=3, deadline_seconds=600)
    return name


def site_delta(index: int) -> dict[str, np.ndarray]:
    return {
        "b": np.full(3, 0.1 * index, np.float32),
        "w": np.full((2, 3), -0.05 * index, np.float32),
    }


def run_site(
    url: str,
    study: str,
    index: int,
    errors: list,
    encoding=None,
    delta: dict[str, np.ndarray] | None = None,
    route: str = "upload",
) -> None:
    """Run one site's masking round; ``route`` ``masked`` sends the masked
    update to the masking route, ``upload`` to the round's upload route."""
    name = SITES[index]
    site = MaskingSite(
        site=name,
        study=study,
        round_number=0,
        encoding=encoding or SECURE.encoding(4),
    )
    with AggregationClient(url) as client:
        masking = MaskingClient(url, poll_interval=0.05)
        try:
            masking.run_round(
                site,
                site_delta(index) if delta is None else delta,
                sample_count=10 * (index + 1),
                wait_seconds=60,
                upload=None
                if route == "masked"
                else lambda envelope: client.upload(study, 0, name, envelope),
            )
        except Exception as error:  # reported by the test's assert
            errors.append(error)
        finally:
            masking.close()


@pytest.mark.parametrize("route", ["upload", "masked"])
def test_masking_round_finalizes(service: LocalAggregationService, route: str) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client, SECURE.model_dump(mode="json"))
        errors: list = []
        threads = [
            threading.Thread(
                target=run_site,
                args=(service.url, study, index, errors),
                kwargs={"route": route},
            )
            for index in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        status = client.finalize(study, 0)
        model = client.download_model(study)

    assert errors == []
    assert status["state"] == "finalized"
    # Masked envelopes from either route are stored as the round's uploads
    # once it is unmasked.
    assert sorted(status["uploaded"]) == SITES
    weights = [10 * (index + 1) for index in range(4)]
    mean_b = sum(0.1 * index * weight for index, weight in enumerate(weights)) / 100
    mean_w = sum(-0.05 * index * weight for index, weight in enumerate(weights)) / 100
    bound = SECURE.encoding(4).error_bound(4) / 100 + 1e-7
    np.testing.assert_allclose(model.weights["b"], 1.0 + mean_b, atol=bound)
    np.testing.assert_allclose(model.weights["w"], mean_w, atol=bound)


def test_plain_upload_rejected_in_masking_study(
    service: LocalAggregationService,
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client, "masking")
        envelope = encode_envelope(
            site_delta(1),
            study=study,
            round_number=0,
            site="site-a",
            sample_count=5,
            nonce="0123456789abcdef",
        )

        with pytest.raises(ServiceError) as error:
            client.upload(study, 0, "site-a", envelope)

    assert error.value.status_code == 409
    assert "envelope codec is 'fp32' with {}; this round uses secure aggregation" in (
        str(error.value)
    )


def test_masked_upload_rejected_in_plain_study(
    service: LocalAggregationService,
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client, "none")
        envelope = encode_envelope(
            {"b": np.zeros(3, np.uint32), "w": np.zeros((2, 3), np.uint32)},
            study=study,
            round_number=0,
            site="site-a",
            sample_count=5,
            nonce="0123456789abcdef",
            codec_name="masked",
            codec_params={"fractional_bits": 16},
        )

        with pytest.raises(ServiceError) as error:
            client.upload(study, 0, "site-a", envelope)

    assert error.value.status_code == 422
    assert (
        f"envelope codec 'masked' needs secure_aggregation 'masking', but study "
        f"{study!r} uses 'none'"
    ) in str(error.value)


def weighted_mean(deltas: list[dict], name: str) -> np.ndarray:
    """Return the mean of tensor ``name`` weighted as ``run_site`` weights it."""
    weights = [10 * (index + 1) for index in range(len(deltas))]
    total = sum(
        delta[name].astype(np.float64) * weight
        for delta, weight in zip(deltas, weights, strict=True)
    )
    return total / sum(weights)


def run_int8_round(url: str, study: str, deltas: list[dict]) -> list:
    encoding = SECURE_INT8.encoding(4, get_codec("int8", {"scale": INT8_SCALE}))
    assert isinstance(encoding, Int8RingEncoding)
    errors: list = []
    threads = [
        threading.Thread(
            target=run_site,
            args=(url, study, index, errors, encoding, deltas[index]),
        )
        for index in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_int8_masking_round_exact_on_levels(service: LocalAggregationService) -> None:
    # Multiples of the scale are int8 levels, so stochastic rounding keeps
    # them, and the service's mean is exact up to float32.
    deltas = [
        {
            "b": np.full(3, (10 * index - 20) * INT8_SCALE, np.float32),
            "w": np.arange(6, dtype=np.float32).reshape(2, 3) * index * INT8_SCALE,
        }
        for index in range(4)
    ]
    with AggregationClient(service.url) as client:
        study = create_study(
            client, SECURE_INT8.model_dump(mode="json"), INT8_COMPRESSION
        )
        errors = run_int8_round(service.url, study, deltas)
        status = client.finalize(study, 0)
        model = client.download_model(study)

    assert errors == []
    assert status["state"] == "finalized"
    np.testing.assert_allclose(
        model.weights["b"], 1.0 + weighted_mean(deltas, "b"), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        model.weights["w"], weighted_mean(deltas, "w"), rtol=0, atol=1e-6
    )


def test_int8_masking_round_within_bound(service: LocalAggregationService) -> None:
    rng = np.random.default_rng(5)
    deltas = [
        {
            "b": rng.uniform(-1, 1, 3).astype(np.float32),
            "w": rng.uniform(-1, 1, (2, 3)).astype(np.float32),
        }
        for _ in range(4)
    ]
    with AggregationClient(service.url) as client:
        study = create_study(
            client, SECURE_INT8.model_dump(mode="json"), INT8_COMPRESSION
        )
        errors = run_int8_round(service.url, study, deltas)
        client.finalize(study, 0)
        model = client.download_model(study)

    assert errors == []
    for name, base in INITIAL.items():
        error = np.abs(model.weights[name] - (base + weighted_mean(deltas, name)))
        # The mean is off by less than one scale step, plus float32 rounding.
        assert error.max() < INT8_SCALE + 1e-6, name


def test_fixed_point_upload_rejected_in_int8_study(
    service: LocalAggregationService,
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(
            client, SECURE_INT8.model_dump(mode="json"), INT8_COMPRESSION
        )
        envelope = encode_envelope(
            {"b": np.zeros(3, np.uint32), "w": np.zeros((2, 3), np.uint32)},
            study=study,
            round_number=0,
            site="site-a",
            sample_count=5,
            nonce="0123456789abcdef",
            codec_name="masked",
            codec_params={"ring_bits": 32, "fractional_bits": 10},
        )

        with pytest.raises(ServiceError) as error:
            client.upload(study, 0, "site-a", envelope)

    assert error.value.status_code == 409
    assert "expects 'masked' with {'ring_bits': 32, 'int8_scale': 0.015625}" in str(
        error.value
    )


def test_int8_chunks_rejected_in_masking_study(
    service: LocalAggregationService,
) -> None:
    with AggregationClient(service.url) as client, pytest.raises(ServiceError) as error:
        create_study(client, "masking", {"codec": "int8", "params": {"chunk_size": 8}})

    assert error.value.status_code == 422
    message = str(error.value)
    assert "invalid compression study setting" in message
    assert "set the shared scale instead" in message


def hold_roster_request(
    pool: ThreadPoolExecutor, url: str, study: str, wait: float
) -> tuple[Future[httpx.Response], bool]:
    """Send a roster request that waits up to ``wait`` s, and return it after 1 s.

    Also return whether it was still held then.
    """
    roster_url = f"{url}/v1/studies/{study}/rounds/0/secagg/roster"
    held_request = pool.submit(httpx.get, roster_url, params={"wait": wait}, timeout=60)
    time.sleep(1.0)
    return held_request, not held_request.done()


def test_quorum_abort_wakes_held_request(service: LocalAggregationService) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client, "masking")
        with ThreadPoolExecutor(1) as pool:
            held_request, was_held = hold_roster_request(pool, service.url, study, 20)
            # No site uploaded and all are absent, so the quorum of 3 fails.
            status = client.finalize(study, 0, absent=SITES)
            aborted_at = time.monotonic()
            response = held_request.result(timeout=60)
            returned_at = time.monotonic()

    assert was_held
    assert status["state"] == "aborted"
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"masking round 0 of study {study!r} was aborted: {status['reason']}"
    }
    assert returned_at - aborted_at < 5


def test_stopping_service_cuts_held_request(tmp_path) -> None:
    # A held poll may wait 30 s, and a stopping service must not wait with it.
    with LocalAggregationService(tmp_path, max_upload_bytes=1_000_000) as running:
        with AggregationClient(running.url) as client:
            study = create_study(client, "masking")
        with ThreadPoolExecutor(1) as pool:
            held_request, was_held = hold_roster_request(pool, running.url, study, 30)
            assert running.process is not None
            running.process.terminate()
            stopped_at = time.monotonic()
            returncode = running.process.wait(timeout=25)
            exited_after = time.monotonic() - stopped_at
            with pytest.raises(httpx.HTTPError):
                held_request.result(timeout=60).raise_for_status()

    assert was_held
    # uvicorn shuts down, then raises the SIGTERM it caught again.
    assert returncode == -signal.SIGTERM
    assert exited_after < SHUTDOWN_GRACE_SECONDS + 10
    log = (tmp_path / "service.log").read_text(encoding="utf-8")
    assert "timeout graceful shutdown exceeded" in log


def test_corrupted_saved_round_keeps_model(tmp_path) -> None:
    with (
        LocalAggregationService(tmp_path, max_upload_bytes=1_000_000) as running,
        AggregationClient(running.url) as client,
    ):
        study = create_study(client, "masking")
    with sqlite3.connect(tmp_path / "aggregation.sqlite3") as connection:
        updated = connection.execute(
            "UPDATE masking_rounds SET setup = substr(setup, 1, 20)"
        ).rowcount
    assert updated == 1

    with (
        LocalAggregationService(tmp_path, max_upload_bytes=1_000_000) as running,
        AggregationClient(running.url) as client,
    ):
        roster = httpx.get(f"{running.url}/v1/studies/{study}/rounds/0/secagg/roster")
        # The sites' tasks fail with the abort, so the flow reports them absent.
        status = client.finalize(study, 0, absent=SITES)
        model = client.download_model(study)

    assert roster.status_code == 409
    assert "its saved state could not be restored" in roster.json()["detail"]
    assert status["state"] == "aborted"
    assert model.version == 0
    log = (tmp_path / "service.log").read_text(encoding="utf-8")
    assert "aborted masking round 0 of study" in log
