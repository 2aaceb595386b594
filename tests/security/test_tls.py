"""Mutual TLS on a real uvicorn server: who may call, and as whom."""

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from medfed.aggregation.tls import (
    AuthenticationSettings,
    authenticated_coordinator,
    authenticated_site,
    configure_authentication,
    uvicorn_tls_options,
)
from medfed.contract.kits import KitFiles, client_ssl_context

from .servers import serve


def _app(events: list[tuple[str, str, dict[str, Any]]], *, require: bool) -> FastAPI:
    app = FastAPI()
    configure_authentication(
        app,
        AuthenticationSettings(
            require_client_certificate=require,
            on_event=lambda event, actor, details: events.append(
                (event, actor, details)
            ),
        ),
    )

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/studies/{study}/sites/{site}/whoami")
    def whoami(study: str, site: str = Depends(authenticated_site)) -> dict[str, str]:
        return {"site": site}

    @app.post("/v1/admin")
    def admin(actor: str = Depends(authenticated_coordinator)) -> dict[str, str]:
        return {"actor": actor}

    return app


@pytest.fixture(scope="module")
def events() -> list[tuple[str, str, dict[str, Any]]]:
    return []


@pytest.fixture(scope="module")
def tls_url(kits: dict[str, Path], events) -> Iterator[str]:
    app = _app(events, require=True)
    with serve(app, **uvicorn_tls_options(kits["aggregation"])) as url:
        yield url


def _client(kit: Path | None, trust: Path) -> httpx.Client:
    if kit is None:
        context = ssl.create_default_context(cafile=str(trust / KitFiles.CA_CERT))
    else:
        context = client_ssl_context(kit)
        context.load_verify_locations(cafile=str(trust / KitFiles.CA_CERT))
    return httpx.Client(verify=context, timeout=10)


def test_site_reaches_own_endpoint(tls_url, kits, events) -> None:
    with _client(kits["site-alpha"], kits["aggregation"]) as client:
        response = client.get(f"{tls_url}/v1/studies/heart/sites/alpha/whoami")
    assert response.status_code == 200
    assert response.json() == {"site": "alpha"}
    assert ("site.authenticated", "alpha") in [(e, a) for e, a, _ in events]


def test_missing_client_certificate_rejected(tls_url, kits) -> None:
    with _client(None, kits["aggregation"]) as client:
        response = client.get(f"{tls_url}/v1/studies/heart/sites/alpha/whoami")
        health = client.get(f"{tls_url}/health")
    assert response.status_code == 401
    assert response.json()["detail"].startswith("client certificate required")
    assert health.status_code == 200


def test_foreign_ca_certificate_rejected(tls_url, kits, foreign_kits) -> None:
    """The server aborts the handshake, so no HTTP response ever comes back.

    Under TLS 1.3 the client learns it only when reading the response. Under
    TLS 1.2 the handshake itself fails: asyncio's server closes the connection,
    with or without sending OpenSSL's "unknown CA" alert first.
    """
    url = f"{tls_url}/v1/studies/heart/sites/alpha/whoami"
    client = _client(foreign_kits["site-alpha"], kits["aggregation"])
    with client, pytest.raises(httpx.RemoteProtocolError, match="without sending a"):
        client.get(url)

    context = client_ssl_context(foreign_kits["site-alpha"])
    context.load_verify_locations(cafile=str(kits["aggregation"] / KitFiles.CA_CERT))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        httpx.Client(verify=context) as client,
        pytest.raises(
            httpx.ConnectError, match=r"EOF occurred in violation|ALERT_UNKNOWN_CA"
        ),
    ):
        client.get(url)


def test_other_site_path_rejected(tls_url, kits, events) -> None:
    with _client(kits["site-alpha"], kits["aggregation"]) as client:
        response = client.get(f"{tls_url}/v1/studies/heart/sites/beta/whoami")
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "client certificate is for site 'alpha' but the request is for site "
        "'beta': a site can act only as itself"
    )
    rejected = [
        d for e, a, d in events if e == "authentication.rejected" and a == "alpha"
    ]
    assert rejected[-1]["reason"] == "site mismatch"


def test_coordinator_cannot_act_as_site(tls_url, kits) -> None:
    with _client(kits["coordinator"], kits["aggregation"]) as client:
        response = client.get(f"{tls_url}/v1/studies/heart/sites/alpha/whoami")
        admin = client.post(f"{tls_url}/v1/admin")
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "client certificate belongs to the coordinator, not to a site"
    )
    assert admin.status_code == 200
    assert admin.json() == {"actor": "coordinator"}


def test_site_cannot_call_coordinator_endpoint(tls_url, kits) -> None:
    with _client(kits["site-beta"], kits["aggregation"]) as client:
        response = client.post(f"{tls_url}/v1/admin")
    assert response.status_code == 403
    assert "only the coordinator may call this endpoint" in response.json()["detail"]


def test_client_rejects_foreign_server(tls_url, foreign_kits) -> None:
    client = httpx.Client(verify=client_ssl_context(foreign_kits["site-alpha"]))
    with client, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get(f"{tls_url}/health")


def test_plain_http_rejected(tls_url) -> None:
    with httpx.Client(timeout=5) as client, pytest.raises(httpx.TransportError):
        client.get(tls_url.replace("https://", "http://") + "/health")


def test_local_mode_uses_path_site(events) -> None:
    with serve(_app(events, require=False)) as url, httpx.Client() as client:
        response = client.get(f"{url}/v1/studies/heart/sites/beta/whoami")
    assert response.status_code == 200
    assert response.json() == {"site": "beta"}


def test_plain_http_without_local_mode_rejected(events) -> None:
    with serve(_app(events, require=True)) as url, httpx.Client() as client:
        response = client.get(f"{url}/v1/studies/heart/sites/beta/whoami")
    assert response.status_code == 401
    assert "client certificate required" in response.json()["detail"]
