"""Masking rounds over HTTP: real uvicorn on 127.0.0.1, real httpx clients."""

import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

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
from medfed.sites.client import AggregationClient
from medfed.sites.secagg_client import BackgroundMaskingRound, MaskingClient

STUDY = "heart"
SITES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
SHAPES = {"bias": (2,), "weight": (3, 2)}
ENCODING = FixedPointEncoding(
    fractional_bits=10, clip=2.0, max_weight=100, site_count=5
)


@contextmanager
def serve(rounds: MaskingRounds, record=None) -> Iterator[str]:
    """Serve the masking routes of ``rounds`` on 127.0.0.1; yield the URL.

    ``record`` receives the routes' audit events, as the service's audit log
    would.
    """
    app = FastAPI()
    app.include_router(create_masking_router(rounds, record=record))
    install_error_handlers(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    while not server.started:
        time.sleep(0.01)
    host, port = sock.getsockname()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def service():
    rounds = MaskingRounds()
    with serve(rounds) as url:
        yield rounds, url


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


# wait_per_poll 0 is the polling fallback for a service without held requests.
@pytest.mark.parametrize("wait_per_poll", [0.0, 20.0])
def test_round_with_dropout_over_http(service, wait_per_poll):
    rounds, url = service
    open_round(rounds, 0)
    errors = []
    costs = {}

    def run_site(index, name):
        client = MaskingClient(url, poll_interval=0.05, wait_per_poll=wait_per_poll)
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


# Held requests (query parameter ``wait``)


def prefix_of(url, round_number):
    return f"{url}/v1/studies/{STUDY}/rounds/{round_number}/secagg"


def advertise(url, round_number, names):
    for name in names:
        site = MaskingSite(
            site=name, study=STUDY, round_number=round_number, encoding=ENCODING
        )
        response = httpx.post(
            f"{prefix_of(url, round_number)}/keys",
            json=site.advertise().model_dump(mode="json"),
        )
        assert response.status_code == 200, response.text


def timed_get(url, **params):
    """GET ``url``; return the response and the monotonic time it arrived."""
    response = httpx.get(url, params=params, timeout=120)
    return response, time.monotonic()


def wait_until_held(rounds, round_number, count):
    """Wait until ``count`` requests are held on the round, so none races ahead."""
    deadline = time.monotonic() + 30
    while True:
        with rounds.edit(STUDY, round_number) as entry:
            if len(entry.listeners) >= count:
                return
        assert time.monotonic() < deadline, f"{count} requests were not held"
        time.sleep(0.01)


def test_held_roster_returns_when_keys_close(service):
    rounds, url = service
    open_round(rounds, 10)

    with ThreadPoolExecutor(1) as pool:
        held_request = pool.submit(timed_get, f"{prefix_of(url, 10)}/roster", wait=10)
        wait_until_held(rounds, 10, 1)
        # The fifth advertisement closes advertising.
        advertise(url, 10, SITES)
        closed_at = time.monotonic()
        response, returned_at = held_request.result(timeout=60)

    assert response.status_code == 200
    assert [item["site"] for item in response.json()["advertisements"]] == SITES
    # The bound is far below wait=10 but generous for a loaded machine.
    assert returned_at - closed_at < 5


def test_held_requests_use_no_threads(service):
    # More held requests than the threadpool's 40 threads, so a hold that
    # occupied a thread would leave none for the advertisements.
    rounds, url = service
    open_round(rounds, 11)
    count = 45

    with ThreadPoolExecutor(count) as pool:
        held_requests = [
            pool.submit(timed_get, f"{prefix_of(url, 11)}/roster", wait=20)
            for _ in range(count)
        ]
        wait_until_held(rounds, 11, count)
        advertise(url, 11, SITES)
        responses = [future.result(timeout=60)[0] for future in held_requests]

    assert [response.status_code for response in responses] == [200] * count


def test_wait_clamped_to_maximum():
    rounds = MaskingRounds(max_wait_seconds=1.0)
    open_round(rounds, 12)

    with serve(rounds) as url:
        started = time.monotonic()
        response, returned_at = timed_get(f"{prefix_of(url, 12)}/roster", wait=600)

    assert response.status_code == 425
    assert response.json() == {"detail": "the round's roster is not closed yet"}
    assert returned_at - started >= 0.9
    assert returned_at - started < 30


@pytest.mark.parametrize("route", ["roster", "shares/site-a", "reveal-request"])
@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf", ""])
def test_invalid_wait_rejected(service, route, value):
    rounds, url = service
    open_round(rounds, 13)

    response = httpx.get(f"{prefix_of(url, 13)}/{route}", params={"wait": value})

    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["query", "wait"]]
    with rounds.edit(STUDY, 13) as entry:
        assert entry.server.phase_name == "advertising"
        assert entry.listeners == set()


def test_abort_wakes_held_request(service):
    rounds, url = service
    open_round(rounds, 14)
    expected = {
        "detail": "masking round 14 of study 'heart' was aborted: too few updates"
    }

    with ThreadPoolExecutor(1) as pool:
        held_request = pool.submit(timed_get, f"{prefix_of(url, 14)}/roster", wait=10)
        wait_until_held(rounds, 14, 1)
        aborted = rounds.abort(STUDY, 14, "too few updates")
        aborted_at = time.monotonic()
        response, returned_at = held_request.result(timeout=60)
    later = httpx.get(f"{prefix_of(url, 14)}/reveal-request", params={"wait": 5})

    assert aborted is True
    assert response.status_code == 409
    assert response.json() == expected
    assert returned_at - aborted_at < 5
    assert later.status_code == 409
    assert later.json() == expected
    assert rounds.abort(STUDY, 14, "again") is False


def test_deadline_ends_wait(service):
    rounds, url = service
    deadline_at = time.time() + 1.0
    rounds.open(
        STUDY,
        15,
        sites=SITES,
        threshold=3,
        encoding=ENCODING,
        layout=VectorLayout.from_shapes(SHAPES),
        deadline_at=deadline_at,
    )
    advertise(url, 15, SITES[:3])

    response, _ = timed_get(f"{prefix_of(url, 15)}/roster", wait=20)
    returned_at = time.time()

    # The held request closed the overdue phase with the three sites.
    assert response.status_code == 200
    assert [item["site"] for item in response.json()["advertisements"]] == SITES[:3]
    assert returned_at >= deadline_at
    assert returned_at - deadline_at < 10


def test_client_sends_one_get_per_phase(service):
    rounds, url = service
    open_round(rounds, 16)
    gets: dict[str, int] = {}
    errors = []

    def run_site(index, name):
        def count(request):
            if request.method == "GET":
                gets[name] = gets.get(name, 0) + 1

        http = httpx.Client(base_url=url, event_hooks={"request": [count]})
        # Polls that the service did not hold would be 5 s apart, so a
        # site would need more than three GETs unless its GETs were held.
        client = MaskingClient(url, poll_interval=5.0, http_client=http)
        site = MaskingSite(site=name, study=STUDY, round_number=16, encoding=ENCODING)
        try:
            client.run_round(site, site_update(index), sample_count=10, wait_seconds=60)
        except Exception as error:  # reported by the assert below
            errors.append(error)
        finally:
            http.close()

    threads = [
        threading.Thread(target=run_site, args=(index, name))
        for index, name in enumerate(SITES)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    result = rounds.unmask(STUDY, 16)

    assert errors == []
    assert gets == dict.fromkeys(SITES, 3)
    assert result.survivors == tuple(SITES)


def start_background_rounds(url, round_number, wait_seconds):
    """Start every site's key setup in the background; return them by site."""
    return {
        name: BackgroundMaskingRound(
            MaskingClient(url, poll_interval=0.05),
            MaskingSite(
                site=name, study=STUDY, round_number=round_number, encoding=ENCODING
            ),
            wait_seconds=wait_seconds,
        )
        for name in SITES
    }


def wait_for_shares(url, round_number):
    """Return once the service relays shares, so every site has sent its own."""
    relayed = httpx.get(
        f"{prefix_of(url, round_number)}/shares/site-a",
        params={"wait": 20},
        timeout=30,
    )
    assert relayed.status_code == 200


def finish_sites(background, names, *, updates=None, uploads=None):
    """Finish and close the named sites' rounds at once; return their errors."""
    updates = updates or {}
    uploads = uploads or {}
    errors = {}

    def finish(index, name):
        try:
            background[name].finish(
                updates.get(name, site_update(index)),
                sample_count=10 + index,
                upload=uploads.get(name),
            )
        except Exception as error:  # returned to the test
            errors[name] = error
        finally:
            background[name].close()

    threads = [
        threading.Thread(target=finish, args=(SITES.index(name), name))
        for name in names
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return errors


def test_background_setup_needs_no_update(service):
    rounds, url = service
    open_round(rounds, 17)
    background = start_background_rounds(url, 17, wait_seconds=30)
    # The service relays shares only once every site has sent its own, so
    # this returns only after all five setups ran, before any update.
    wait_for_shares(url, 17)
    # site-e's training fails: closing its round withdraws it.
    background["site-e"].close()
    started = time.monotonic()

    # No coordinator call: the four uploads close the round by themselves.
    errors = finish_sites(background, SITES[:4])
    finished_in = time.monotonic() - started
    with rounds.edit(STUDY, 17) as entry:
        request = entry.server.reveal_request
        withdrawn = entry.server.withdrawn_sites
    result = rounds.unmask(STUDY, 17)

    assert errors == {}
    assert finished_in < 25
    assert withdrawn == ["site-e"]
    assert request.dropped == ["site-e"]
    expected_bias = sum((0.25 * index - 0.5) * (10 + index) for index in range(4))
    np.testing.assert_array_equal(result.weighted_sum, np.full(8, expected_bias))


def test_withdrawal_before_advertising_closes_advertising(service):
    rounds, url = service
    open_round(rounds, 19)
    prefix = prefix_of(url, 19)
    advertise(url, 19, SITES[1:])

    response = httpx.post(f"{prefix}/withdrawals/site-a")
    roster = httpx.get(f"{prefix}/roster")
    late = MaskingSite(site="site-a", study=STUDY, round_number=19, encoding=ENCODING)
    rejected = httpx.post(
        f"{prefix}/keys", json=late.advertise().model_dump(mode="json")
    )

    assert response.status_code == 200
    assert roster.status_code == 200
    assert [item["site"] for item in roster.json()["advertisements"]] == SITES[1:]
    assert rejected.status_code == 409


def test_withdrawal_of_site_outside_round_rejected(service):
    rounds, url = service
    open_round(rounds, 17)

    response = httpx.post(f"{prefix_of(url, 17)}/withdrawals/site-z")

    assert response.status_code == 409
    assert response.json() == {
        "detail": "site 'site-z' is not one of the sites of masking round 17, so "
        "it cannot be withdrawn from it"
    }
    with rounds.edit(STUDY, 17) as entry:
        assert entry.server.withdrawn_sites == []


def test_closing_background_round_stops_its_polls(service):
    rounds, url = service
    open_round(rounds, 18)
    # As in SiteRunner, the HTTP client belongs to the caller and stays open.
    http = httpx.Client(base_url=url)
    # The other four sites never advertise, so the roster never comes.
    background = BackgroundMaskingRound(
        MaskingClient(url, wait_per_poll=0.5, http_client=http),
        MaskingSite(site="site-a", study=STUDY, round_number=18, encoding=ENCODING),
        wait_seconds=5,
    )
    time.sleep(0.2)
    background.close()
    started = time.monotonic()

    try:
        with pytest.raises(ServiceError, match="closed by the site"):
            background.finish(site_update(0), sample_count=10)
    finally:
        http.close()
    assert time.monotonic() - started < 3


def refuse_upload(envelope):
    # A rejection, not a connection error, which the client would retry.
    raise ServiceError(
        "aggregation service rejected PUT with 413: request body too large",
        status_code=413,
    )


@pytest.mark.parametrize("failure", ["nan_update", "upload_fails"])
def test_failed_upload_withdraws_site(service, failure):
    rounds, url = service
    open_round(rounds, 20)
    background = start_background_rounds(url, 20, wait_seconds=20)
    updates, uploads = {}, {}
    if failure == "nan_update":
        # Training diverged: the update cannot be encoded for masking.
        updates["site-e"] = site_update(4)
        updates["site-e"]["bias"][0] = np.nan
    else:
        uploads["site-e"] = refuse_upload

    errors = finish_sites(background, SITES, updates=updates, uploads=uploads)
    with rounds.edit(STUDY, 20) as entry:
        withdrawn = entry.server.withdrawn_sites
        request = entry.server.reveal_request
    result = rounds.unmask(STUDY, 20)

    assert sorted(errors) == ["site-e"]
    assert withdrawn == ["site-e"]
    assert request.dropped == ["site-e"]
    expected_bias = sum((0.25 * index - 0.5) * (10 + index) for index in range(4))
    np.testing.assert_array_equal(result.weighted_sum, np.full(8, expected_bias))


def test_withdrawals_below_threshold_abort_round(service):
    rounds, url = service
    open_round(rounds, 21)
    background = start_background_rounds(url, 21, wait_seconds=20)
    wait_for_shares(url, 21)
    # Three of five sites fail, so at most two can upload, below threshold 3.
    for name in SITES[2:]:
        background[name].close()

    errors = finish_sites(background, SITES[:2])
    prefix = prefix_of(url, 21)
    later = httpx.get(f"{prefix}/reveal-request")

    assert sorted(errors) == ["site-a", "site-b"]
    for error in errors.values():
        assert error.status_code == 409
        message = str(error)
        assert re.search(r"was aborted: after site 'site-[cde]' withdrew", message)
        assert "at most 2 sites can upload, fewer than the threshold 3" in message
    assert later.status_code == 409
    assert "was aborted" in later.json()["detail"]


def test_withdrawal_after_caller_closed_client(service, caplog):
    rounds, url = service
    open_round(rounds, 22)
    http = httpx.Client(base_url=url)
    background = BackgroundMaskingRound(
        MaskingClient(url, wait_per_poll=0.5, http_client=http),
        MaskingSite(site="site-a", study=STUDY, round_number=22, encoding=ENCODING),
        wait_seconds=5,
    )
    time.sleep(0.2)
    # The round fails and its caller closes the shared client while the
    # setup thread still waits for the roster.
    background.close()
    http.close()

    # The held poll fails on the closed client, or ends at its wait.
    with pytest.raises(ServiceError, match=r"unreachable|closed by the site"):
        background.finish(site_update(0), sample_count=10)
    # finish joined the setup thread, which then tried to withdraw.
    assert "the site's HTTP client is closed" in caplog.text


def test_site_closed_before_roster_leaves_it(service):
    rounds, url = service
    open_round(rounds, 23)
    # site-e's training fails before any other site has advertised, and its
    # setup gives up at its next poll, still before the roster.
    early = BackgroundMaskingRound(
        MaskingClient(url, wait_per_poll=0.5),
        MaskingSite(site="site-e", study=STUDY, round_number=23, encoding=ENCODING),
        wait_seconds=20,
    )
    early.close()
    with pytest.raises(ServiceError, match="closed by the site"):
        early.finish(site_update(4), sample_count=14)  # joins the setup thread
    background = {
        name: BackgroundMaskingRound(
            MaskingClient(url, poll_interval=0.05),
            MaskingSite(site=name, study=STUDY, round_number=23, encoding=ENCODING),
            wait_seconds=20,
        )
        for name in SITES[:4]
    }
    errors = {}

    def finish(index, name):
        try:
            background[name].finish(site_update(index), sample_count=10 + index)
        except ServiceError as error:
            errors[name] = error
        finally:
            background[name].close()

    threads = [
        threading.Thread(target=finish, args=(index, name))
        for index, name in enumerate(SITES[:4])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    with rounds.edit(STUDY, 23) as entry:
        roster = entry.server.roster
        withdrawn = entry.server.withdrawn_sites
    result = rounds.unmask(STUDY, 23)

    assert errors == {}
    assert withdrawn == ["site-e"]
    assert roster.sites == SITES[:4]
    expected_bias = sum((0.25 * index - 0.5) * (10 + index) for index in range(4))
    np.testing.assert_array_equal(result.weighted_sum, np.full(8, expected_bias))


def test_withdrawal_closes_sharing(service):
    rounds, url = service
    open_round(rounds, 24)
    prefix = prefix_of(url, 24)
    sites = {
        name: MaskingSite(site=name, study=STUDY, round_number=24, encoding=ENCODING)
        for name in SITES
    }
    for site in sites.values():
        httpx.post(f"{prefix}/keys", json=site.advertise().model_dump(mode="json"))
    roster = httpx.get(f"{prefix}/roster").json()
    for name in SITES[:4]:
        upload = sites[name].share_keys(roster)
        httpx.post(f"{prefix}/shares", json=upload.model_dump(mode="json"))
    pending = ThreadPoolExecutor(1).submit(
        httpx.get, f"{prefix}/shares/site-a", params={"wait": 20}, timeout=30
    )

    # site-e fails before it shares keys, so no site waits for its shares.
    withdrawn = httpx.post(f"{prefix}/withdrawals/site-e")
    relayed = pending.result(timeout=30)

    assert withdrawn.status_code == 200
    assert relayed.status_code == 200
    assert sorted(share["sender"] for share in relayed.json()) == SITES[1:4]
    with rounds.edit(STUDY, 24) as entry:
        assert entry.server.phase_name == "uploading"
        assert entry.server.sharing_sites == SITES[:4]


# Withdrawals that the coordinator sends for a site that died


@pytest.fixture
def audited_service():
    """A service whose audit events are collected in a list."""
    rounds = MaskingRounds()
    events = []
    with serve(rounds, record=lambda *event: events.append(event)) as url:
        yield rounds, url, events


def wait_for_uploads(rounds, round_number, names):
    deadline = time.monotonic() + 30
    while True:
        with rounds.edit(STUDY, round_number) as entry:
            if entry.server.uploaded_sites == names:
                return
        assert time.monotonic() < deadline, f"{names} did not upload in time"
        time.sleep(0.05)


def test_coordinator_withdraws_dead_site(audited_service):
    rounds, url, events = audited_service
    open_round(rounds, 30)
    background = start_background_rounds(url, 30, wait_seconds=30)
    wait_for_shares(url, 30)
    # site-e shared its keys and then died: it never uploads or withdraws.
    try:
        with ThreadPoolExecutor(1) as pool:
            finishing = pool.submit(finish_sites, background, SITES[:4])
            # The four survivors uploaded and now wait for the reveal request.
            wait_for_uploads(rounds, 30, SITES[:4])
            with AggregationClient(url) as coordinator:
                withdrawn = coordinator.withdraw_site(STUDY, 30, "site-e")
            errors = finishing.result(timeout=60)
        with rounds.edit(STUDY, 30) as entry:
            request = entry.server.reveal_request
            withdrawn_sites = entry.server.withdrawn_sites
        result = rounds.unmask(STUDY, 30)
        recorded = list(events)
    finally:
        # site-e's own withdrawal comes after the round and is rejected.
        background["site-e"].close()

    assert withdrawn is True
    assert errors == {}
    assert withdrawn_sites == ["site-e"]
    assert request.dropped == ["site-e"]
    assert result.survivors == tuple(SITES[:4])
    expected_bias = sum((0.25 * index - 0.5) * (10 + index) for index in range(4))
    np.testing.assert_array_equal(result.weighted_sum, np.full(8, expected_bias))
    assert recorded == [
        (
            "site.withdrawn",
            "coordinator",
            {"study": STUDY, "round": 30, "site": "site-e", "phase": "uploading"},
        )
    ]


def test_withdrawal_after_upload_rejected(audited_service):
    rounds, url, events = audited_service
    open_round(rounds, 31)
    background = start_background_rounds(url, 31, wait_seconds=30)
    wait_for_shares(url, 31)
    coordinator = AggregationClient(url)
    try:
        with ThreadPoolExecutor(1) as pool:
            finishing = pool.submit(finish_sites, background, SITES[:4])
            wait_for_uploads(rounds, 31, SITES[:4])
            with rounds.edit(STUDY, 31) as entry:
                before = entry.server.export_state()

            with pytest.raises(ServiceError) as rejection:
                coordinator.withdraw_site(STUDY, 31, "site-a")

            with rounds.edit(STUDY, 31) as entry:
                after = entry.server.export_state()
            # Withdrawing site-e, which never uploaded, lets the round finish.
            coordinator.withdraw_site(STUDY, 31, "site-e")
            errors = finishing.result(timeout=60)
        result = rounds.unmask(STUDY, 31)
        recorded = list(events)
    finally:
        coordinator.close()
        background["site-e"].close()

    assert rejection.value.status_code == 409
    assert str(rejection.value) == (
        "aggregation service rejected POST "
        "/v1/studies/heart/rounds/31/secagg/withdrawals/site-a with 409: site "
        "'site-a' already uploaded this round, so it cannot be withdrawn: its "
        "update is part of the round's sum"
    )
    assert after == before
    assert after["phase"] == "uploading"
    assert after["withdrawn"] == []
    assert errors == {}
    assert result.survivors == tuple(SITES[:4])
    expected_bias = sum((0.25 * index - 0.5) * (10 + index) for index in range(4))
    np.testing.assert_array_equal(result.weighted_sum, np.full(8, expected_bias))
    assert recorded[0] == (
        "site.withdrawal_rejected",
        "coordinator",
        {
            "study": STUDY,
            "round": 31,
            "site": "site-a",
            "status": 409,
            "reason": "site 'site-a' already uploaded this round, so it cannot be "
            "withdrawn: its update is part of the round's sum",
        },
    )
    assert [event[:2] for event in recorded[1:]] == [("site.withdrawn", "coordinator")]


def test_repeated_withdrawal_changes_nothing(audited_service):
    rounds, url, events = audited_service
    open_round(rounds, 32)
    # site-e has not advertised yet, so advertising stays open.
    advertise(url, 32, SITES[:4])
    prefix = prefix_of(url, 32)

    first = httpx.post(f"{prefix}/withdrawals/site-d")
    with AggregationClient(url) as coordinator:
        again = coordinator.withdraw_site(STUDY, 32, "site-d")

    assert first.status_code == 200
    assert first.json() == {"site": "site-d", "already_withdrawn": False}
    assert again is False
    assert events == [
        (
            "site.withdrawn",
            "site-d",
            {"study": STUDY, "round": 32, "site": "site-d", "phase": "advertising"},
        )
    ]
    with rounds.edit(STUDY, 32) as entry:
        assert entry.server.withdrawn_sites == ["site-d"]
        assert entry.server.advertised_sites == SITES[:3]
