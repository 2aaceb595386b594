"""Body-size, rate and concurrency limits on a real uvicorn server."""

import asyncio
import json
import threading
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request

from medfed.aggregation.limits import (
    KEEP_ALIVE_SECONDS,
    ServiceLimits,
    TokenBucket,
    install_limits,
    uvicorn_limit_options,
)
from medfed.errors import ConfigError
from medfed.sites.client import connection_limits

from .servers import raw_http, serve

LIMIT = 64 * 1024


def _app(limits: ServiceLimits, received: list[int]) -> FastAPI:
    app = FastAPI()
    install_limits(app, limits)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.put("/upload")
    async def upload(request: Request) -> dict[str, int]:
        body = await request.body()
        received.append(len(body))
        return {"bytes": len(body)}

    return app


@pytest.fixture(scope="module")
def received() -> list[int]:
    return []


@pytest.fixture(scope="module")
def url(received) -> Iterator[str]:
    limits = ServiceLimits(max_body_bytes=LIMIT, rate_per_second=1000, rate_burst=1000)
    with serve(_app(limits, received), **uvicorn_limit_options(limits)) as base:
        yield base


def test_body_at_limit_accepted(url, received) -> None:
    response = httpx.put(f"{url}/upload", content=b"x" * LIMIT)
    assert response.status_code == 200
    assert response.json() == {"bytes": LIMIT}


def test_declared_oversize_rejected(url, received) -> None:
    """A 10 GB Content-Length is rejected before any body byte is read."""
    count = len(received)
    request = (
        b"PUT /upload HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-length: 10737418240\r\n\r\nsmall"
    )
    status, body = raw_http(url, request)
    assert status == 413
    assert json.loads(body)["detail"] == (
        f"request body of {10 * 1024**3} bytes exceeds the limit of {LIMIT} bytes"
    )
    assert len(received) == count


def test_streamed_oversize_rejected(url, received) -> None:
    count = len(received)

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"y" * 4096

    response = httpx.put(f"{url}/upload", content=chunks())
    assert response.status_code == 413
    assert (
        response.json()["detail"] == f"request body exceeds the limit of {LIMIT} bytes"
    )
    assert len(received) == count


def test_invalid_content_length_rejected(url) -> None:
    request = b"PUT /upload HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: -3\r\n\r\n"
    status, _ = raw_http(url, request)
    assert status == 400


def test_rate_limit_returns_429(received) -> None:
    limits = ServiceLimits(max_body_bytes=LIMIT, rate_per_second=0.5, rate_burst=3)
    with serve(_app(limits, received)) as base, httpx.Client() as client:
        statuses = [
            client.put(f"{base}/upload", content=b"a").status_code for _ in range(5)
        ]
        limited = client.put(f"{base}/upload", content=b"a")
        health = client.get(f"{base}/health")
    assert statuses == [200, 200, 200, 429, 429]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] in ("1", "2")
    assert limited.json()["detail"].startswith(
        "rate limit of 0.5 requests per second exceeded for address 127.0.0.1"
    )
    assert health.status_code == 200


def test_concurrency_cap_returns_503() -> None:
    """Requests beyond ``max_concurrency`` get uvicorn's 503 while others wait."""
    gate = threading.Event()
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        while not gate.is_set():
            await asyncio.sleep(0.01)
        return {"status": "done"}

    limits = ServiceLimits(max_concurrency=2)
    with serve(app, **uvicorn_limit_options(limits)) as base:

        async def run() -> list[int]:
            async with httpx.AsyncClient(timeout=20) as client:
                first = asyncio.create_task(client.get(f"{base}/slow"))
                await asyncio.sleep(0.5)
                extra = [await client.get(f"{base}/slow") for _ in range(1)]
                gate.set()
                return [(await first).status_code, *(r.status_code for r in extra)]

        statuses = asyncio.run(run())
    assert statuses == [200, 503]


def test_token_bucket_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, capacity=2, clock=lambda: now[0])
    assert bucket.take() == 0
    assert bucket.take() == 0
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0
    now[0] = 100.0
    assert [bucket.take() for _ in range(3)] == [0, 0, pytest.approx(0.5)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_body_bytes": 0}, "max_body_bytes must be a positive integer, got 0"),
        (
            {"rate_per_second": float("nan")},
            "rate_per_second must be a positive number",
        ),
        ({"rate_burst": 1.5}, "rate_burst must be a positive integer, got 1.5"),
        ({"max_concurrency": -1}, "max_concurrency must be a positive integer, got -1"),
    ],
)
def test_invalid_limits_rejected(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        ServiceLimits(**options)


def test_rate_limit_per_site_over_tls(kits, received) -> None:
    """Each site has its own bucket: one site's burst does not throttle another."""
    from medfed.aggregation.tls import uvicorn_tls_options
    from medfed.contract.kits import client_ssl_context

    limits = ServiceLimits(max_body_bytes=LIMIT, rate_per_second=0.5, rate_burst=2)
    app = _app(limits, received)
    with serve(app, **uvicorn_tls_options(kits["aggregation"])) as base:
        alpha = httpx.Client(verify=client_ssl_context(kits["site-alpha"]))
        beta = httpx.Client(verify=client_ssl_context(kits["site-beta"]))
        with alpha, beta:
            alpha_statuses = [alpha.put(f"{base}/upload").status_code for _ in range(3)]
            limited = alpha.put(f"{base}/upload")
            beta_status = beta.put(f"{base}/upload").status_code
    assert alpha_statuses == [200, 200, 429]
    assert limited.json()["detail"].startswith(
        "rate limit of 0.5 requests per second exceeded for site alpha"
    )
    assert beta_status == 200


def test_clients_drop_idle_connections_first() -> None:
    """Clients must not reuse a connection that the service may be closing."""
    options = uvicorn_limit_options(ServiceLimits())

    assert options["timeout_keep_alive"] == KEEP_ALIVE_SECONDS
    assert connection_limits().keepalive_expiry < KEEP_ALIVE_SECONDS
