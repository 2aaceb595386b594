"""Retries of the coordinator's Prefect API calls in deployment mode.

A loaded Prefect server that returns 5xx cannot be produced on demand, so a
small HTTP server on 127.0.0.1 replaces it and returns a scripted list of
status codes. The requests and the retry logic are real.
"""

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from medfed.flows import deployments
from medfed.flows.deployments import PREFECT_API_ATTEMPTS, call_prefect_api


class _ScriptedServer:
    """Respond to each request with the next status code of ``statuses``."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests = 0
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index = min(script.requests, len(script.statuses) - 1)
                script.requests += 1
                self.send_response(script.statuses[index])
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/hello"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def get(self) -> int:
        response = httpx.get(self.url, timeout=5)
        response.raise_for_status()
        return response.status_code


@pytest.fixture
def scripted(request: pytest.FixtureRequest) -> Iterator[_ScriptedServer]:
    server = _ScriptedServer(request.param)
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployments, "PREFECT_API_FIRST_BACKOFF", 0.01)


@pytest.mark.parametrize("scripted", [[503, 500, 200]], indirect=True)
def test_server_errors_are_retried(
    scripted: _ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="medfed.flows.deployments"):
        status = call_prefect_api("read flow run 'a'", scripted.get)

    assert status == 200
    assert scripted.requests == 3
    retries = [record.getMessage() for record in caplog.records]
    assert len(retries) == 2
    assert "read flow run 'a' failed (attempt 1 of 6): HTTP 503" in retries[0]
    assert "(attempt 2 of 6): HTTP 500" in retries[1]


@pytest.mark.parametrize("scripted", [[503]], indirect=True)
def test_retries_stop_after_max_attempts(scripted: _ScriptedServer) -> None:
    with pytest.raises(httpx.HTTPStatusError) as raised:
        call_prefect_api("read flow run 'a'", scripted.get)

    assert raised.value.response.status_code == 503
    assert scripted.requests == PREFECT_API_ATTEMPTS


@pytest.mark.parametrize("scripted", [[404, 200]], indirect=True)
def test_client_error_is_not_retried(scripted: _ScriptedServer) -> None:
    with pytest.raises(httpx.HTTPStatusError) as raised:
        call_prefect_api("read deployment 'x'", scripted.get)

    assert raised.value.response.status_code == 404
    assert scripted.requests == 1


def test_refused_connection_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    # A port that was just free: nothing listens there, so connecting fails.
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{server.server_address[1]}/api/hello"
    server.server_close()

    with (
        caplog.at_level(logging.WARNING, logger="medfed.flows.deployments"),
        pytest.raises(httpx.ConnectError),
    ):
        call_prefect_api("create flow run 'b'", lambda: httpx.get(url, timeout=5))

    assert len(caplog.records) == PREFECT_API_ATTEMPTS - 1
    assert "ConnectError" in caplog.records[0].getMessage()
