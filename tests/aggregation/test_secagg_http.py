"""Masking rounds over HTTP: real uvicorn on 127.0.0.1, real httpx clients."""

import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from medfed.aggregation.secagg_routes import (
    MaskingRounds,
    create_masking_router,
    install_error_handlers,
)
from medfed.contract.secagg import FixedPointEncoding, MaskingSite, VectorLayout
from medfed.contract.wire import encode_envelope
from medfed.errors import ServiceError
from medfed.sites.secagg_client import MaskingClient

STUDY = "heart"
SITES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
SHAPES = {"bias": (2,), "weight": (3, 2)}
ENCODING = FixedPointEncoding(
    fractional_bits=10, clip=2.0, max_weight=100, site_count=5
)


@pytest.fixture
def service():
    rounds = MaskingRounds()
    app = FastAPI()
    app.include_router(create_masking_router(rounds))
    install_error_handlers(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    while not server.started:
        time.sleep(0.01)
    host, port = sock.getsockname()
    yield rounds, f"http://{host}:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def open_round(rounds, round_number):
    rounds.open(
        STUDY,
        round_number,
        sites=SITES,
        threshold=3,
        encoding=ENCODING,
        layout=VectorLayout.from_shapes(SHAPES),
    )


def site_update(index):
    return {
        name: np.full(shape, 0.25 * index - 0.5, np.float32)
        for name, shape in SHAPES.items()
    }


def test_round_with_dropout_over_http(service):
    rounds, url = service
    open_round(rounds, 0)
    errors = []
    costs = {}

    def run_site(index, name):
        client = MaskingClient(url, poll_interval=0.05)
        site = MaskingSite(site=name, study=STUDY, round_number=0, encoding=ENCODING)
        try:
            costs[name] = client.run_round(
                site, site_update(index), sample_count=10 + index, wait_seconds=30
            )
        except Exception as error:  # reported by the assert below
            errors.append(error)
        finally:
            client.close()

    def run_dropout():
        # site-e shares its keys, then goes silent before uploading.
        site = MaskingSite(
            site="site-e", study=STUDY, round_number=0, encoding=ENCODING
        )
        prefix = f"{url}/v1/studies/{STUDY}/rounds/0/secagg"
        httpx.post(f"{prefix}/keys", json=site.advertise().model_dump(mode="json"))
        while (roster := httpx.get(f"{prefix}/roster")).status_code == 425:
            time.sleep(0.05)
        upload = site.share_keys(roster.json())
        httpx.post(f"{prefix}/shares", json=upload.model_dump(mode="json"))

    threads = [
        threading.Thread(target=run_site, args=(index, name))
        for index, name in enumerate(SITES[:4])
    ]
    threads.append(threading.Thread(target=run_dropout))
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while True:
        with rounds.edit(STUDY, 0) as entry:
            if len(entry.server.uploaded_sites) == 4:
                break
        assert time.monotonic() < deadline, "sites did not upload in time"
        time.sleep(0.05)
    closed = httpx.post(f"{url}/v1/studies/{STUDY}/rounds/0/secagg/uploads/close")
    for thread in threads:
        thread.join(timeout=30)

    result = rounds.unmask(STUDY, 0)

    assert errors == []
    assert closed.status_code == 200
    assert closed.json()["dropped"] == ["site-e"]
    expected_bias = sum((0.25 * index - 0.5) * (10 + index) for index in range(4))
    np.testing.assert_array_equal(result.weighted_sum, np.full(8, expected_bias))
    assert result.sample_count == 10 + 11 + 12 + 13
    assert sorted(costs) == SITES[:4]
    for name, cost in costs.items():
        # An advertisement alone is two base64 keys and a commitment, and
        # each share upload carries four sealed shares.
        assert cost.message_bytes_sent > 1000, name
        assert cost.message_bytes_received > 1000, name
        assert 0 < cost.compute_seconds <= cost.wall_seconds, name


def test_roster_too_early(service):
    rounds, url = service
    open_round(rounds, 1)

    response = httpx.get(f"{url}/v1/studies/{STUDY}/rounds/1/secagg/roster")

    assert response.status_code == 425
    assert response.json() == {"detail": "the round's roster is not closed yet"}


def test_unknown_round_not_found(service):
    _, url = service

    response = httpx.get(f"{url}/v1/studies/{STUDY}/rounds/7/secagg/roster")

    assert response.status_code == 404
    assert response.json() == {"detail": "no masking round 7 is open for study 'heart'"}


def test_plain_envelope_rejected(service):
    rounds, url = service
    open_round(rounds, 2)
    sites = {
        name: MaskingSite(site=name, study=STUDY, round_number=2, encoding=ENCODING)
        for name in SITES
    }
    prefix = f"{url}/v1/studies/{STUDY}/rounds/2/secagg"
    for site in sites.values():
        httpx.post(f"{prefix}/keys", json=site.advertise().model_dump(mode="json"))
    roster = httpx.get(f"{prefix}/roster").json()
    for site in sites.values():
        upload = site.share_keys(roster)
        httpx.post(f"{prefix}/shares", json=upload.model_dump(mode="json"))
    plain = encode_envelope(
        site_update(0),
        study=STUDY,
        round_number=2,
        site="site-a",
        sample_count=1,
        nonce="0123456789abcdef",
    )

    response = httpx.put(f"{prefix}/masked/site-a", content=plain)

    assert response.status_code == 409
    assert response.json() == {
        "detail": "envelope codec is 'fp32' with {}; this round expects 'masked' "
        "with {'ring_bits': 32, 'fractional_bits': 10}"
    }


def test_client_reports_rejection(service):
    rounds, url = service
    open_round(rounds, 3)
    outsider = MaskingSite(
        site="site-z", study=STUDY, round_number=3, encoding=ENCODING
    )
    client = MaskingClient(url)

    with pytest.raises(ServiceError) as error:
        client.run_round(outsider, site_update(0), sample_count=1, wait_seconds=1)
    client.close()

    assert error.value.status_code == 409
    assert str(error.value) == (
        "aggregation service rejected POST /v1/studies/heart/rounds/3/secagg/keys "
        "with 409: site 'site-z' does not take part in round 3"
    )
