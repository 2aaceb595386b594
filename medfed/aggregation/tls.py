"""Mutual TLS for the aggregation service and the identity of each request.

Uvicorn 0.55 verifies a client certificate during the handshake but does not
pass it to the application. ``TLSH11Protocol`` closes that gap: when a
connection is made it reads the peer certificate from the transport's
``ssl_object`` and adds it to every request scope of that connection as
``scope["extensions"]["tls"]``, with the keys of the ASGI TLS extension
(``client_cert_chain`` contains the leaf certificate as PEM, because Python
3.11 exposes only the leaf). Plain-HTTP connections get no ``tls`` entry.

The server context uses ``CERT_OPTIONAL``: a certificate that does not chain
to the study CA still fails the handshake, and a connection without one
reaches the application, where ``authenticated_site`` rejects it with 401 and
a message saying what is missing. ``/health`` stays reachable without a
certificate so a container probe needs no key.

``authenticated_site`` binds a request to the site named by the URI
``medfed://site/<id>`` in the client certificate, and rejects with 403 a
request whose ``{site}`` path parameter names another site.
"""

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from fastapi import FastAPI, HTTPException, Request
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from medfed.contract.ids import IDENTIFIER_PATTERN, validate_identifier
from medfed.contract.kits import COORDINATOR_URI, SITE_URI_PREFIX, KitFiles
from medfed.errors import ConfigError

__all__ = [
    "AuthenticationSettings",
    "PeerIdentity",
    "TLSH11Protocol",
    "authenticated_coordinator",
    "authenticated_participant",
    "authenticated_site",
    "configure_authentication",
    "peer_identity",
    "uvicorn_tls_options",
]

logger = logging.getLogger(__name__)

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


@dataclass(frozen=True)
class PeerIdentity:
    """The participant a verified client certificate names."""

    role: Literal["site", "coordinator"]
    name: str
    serial_number: int


@dataclass(frozen=True)
class AuthenticationSettings:
    """Authentication policy of the service.

    Attributes:
        require_client_certificate: True in deployment mode. False only in
            local mode, where the service listens on 127.0.0.1 without TLS
            and takes the site from the request path.
        on_event: called as ``on_event(event, actor, details)`` for each
            authentication and each rejection, so the service can audit them.
    """

    require_client_certificate: bool = True
    on_event: Callable[[str, str, dict[str, Any]], None] | None = None
    #: (participant, certificate serial) pairs already audited as authenticated.
    authenticated: set[tuple[str, int]] = field(
        default_factory=set, compare=False, repr=False
    )


class TLSH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol that adds the ASGI TLS extension to each scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # asyncio calls connection_made once the TLS handshake has completed,
        # so the peer certificate, if any, is verified and available here.
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _TLSExtensionApp(self.app, _tls_extension(ssl_object))


class _TLSExtensionApp:
    """Wraps one connection's ASGI app to put that connection's TLS data in scope."""

    def __init__(self, app: ASGIApp, extension: dict[str, Any]) -> None:
        self.app = app
        self.extension = extension

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = self.extension
            scope = {**scope, "extensions": extensions}
        await self.app(scope, receive, send)


def _tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
        # Not part of the ASGI extension: the OpenSSL cipher name, for logs.
        "cipher_name": cipher[0] if cipher else None,
    }


def uvicorn_tls_options(kit_dir: Path) -> dict[str, Any]:
    """Return ``uvicorn.Config`` keyword arguments for mTLS from the service kit.

    The options load the service certificate and key, trust only the study
    CA for client certificates, require TLS 1.2 or later, and install
    ``TLSH11Protocol``.
    """
    kit_dir = Path(kit_dir)

    def context_factory(
        config: Config, default_factory: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        context = default_factory()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    return {
        "ssl_certfile": str(kit_dir / KitFiles.TLS_CERT),
        "ssl_keyfile": str(kit_dir / KitFiles.TLS_KEY),
        "ssl_ca_certs": str(kit_dir / KitFiles.CA_CERT),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_context_factory": context_factory,
        "http": TLSH11Protocol,
    }


def configure_authentication(app: FastAPI, settings: AuthenticationSettings) -> None:
    app.state.authentication = settings


def peer_identity(scope: Scope) -> PeerIdentity | None:
    """Return the participant named by the request's client certificate.

    Returns None when the connection is not TLS or carries no client
    certificate. The handshake already verified the certificate against the
    study CA, so this only reads the identity out of it.

    Raises:
        HTTPException: 403 when the certificate names no valid medfed identity.
    """
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls or not tls.get("client_cert_chain"):
        return None
    return _identity_from_pem(tls["client_cert_chain"][0])


@lru_cache(maxsize=1024)
def _identity_from_pem(pem: str) -> PeerIdentity:
    certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    try:
        alternative_names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        raise _forbidden("client certificate has no subject alternative name") from None
    uris = [
        uri
        for uri in alternative_names.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith("medfed://")
    ]
    common_names = [
        attribute.value
        for attribute in certificate.subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME
        )
    ]
    if len(uris) != 1:
        raise _forbidden(
            f"client certificate must name exactly one medfed:// URI, found {uris}"
        )
    uri = uris[0]
    if uri == COORDINATOR_URI:
        identity = PeerIdentity("coordinator", "coordinator", certificate.serial_number)
    elif uri.startswith(SITE_URI_PREFIX) and IDENTIFIER_PATTERN.fullmatch(
        uri.removeprefix(SITE_URI_PREFIX)
    ):
        identity = PeerIdentity(
            "site", uri.removeprefix(SITE_URI_PREFIX), certificate.serial_number
        )
    else:
        raise _forbidden(f"client certificate URI {uri!r} names no medfed participant")
    if common_names != [identity.name]:
        raise _forbidden(
            f"client certificate common name {common_names} does not match its "
            f"URI {uri!r}"
        )
    return identity


def authenticated_site(request: Request) -> str:
    """Return the site a request acts as; a FastAPI dependency for site endpoints.

    With client certificates required, the site is the one the certificate
    names, and a ``{site}`` path parameter must equal it. In local mode the
    site is the validated ``{site}`` path parameter.

    Raises:
        HTTPException: 401 without a client certificate, 403 when the
            certificate is not a site's or names another site than the path.
    """
    settings = _settings(request)
    path_site = request.path_params.get("site")
    identity = peer_identity(request.scope)
    if identity is None:
        if settings.require_client_certificate:
            raise _unauthorized(request, settings, "site")
        try:
            return validate_identifier(path_site, kind="site")
        except ConfigError as error:
            raise HTTPException(422, str(error)) from None
    if identity.role != "site":
        _record(
            settings,
            "authentication.rejected",
            identity.name,
            request,
            reason="not a site certificate",
        )
        raise HTTPException(
            403, "client certificate belongs to the coordinator, not to a site"
        )
    if path_site is not None and path_site != identity.name:
        _record(
            settings,
            "authentication.rejected",
            identity.name,
            request,
            reason="site mismatch",
        )
        raise HTTPException(
            403,
            f"client certificate is for site {identity.name!r} but the request "
            f"is for site {path_site!r}: a site can act only as itself",
        )
    _record_success(settings, identity, request)
    return identity.name


def authenticated_coordinator(request: Request) -> str:
    """Return "coordinator" for a request from the coordinator; else raise.

    Raises:
        HTTPException: 401 without a client certificate, 403 when the
            certificate is a site's.
    """
    settings = _settings(request)
    identity = peer_identity(request.scope)
    if identity is None:
        if settings.require_client_certificate:
            raise _unauthorized(request, settings, "coordinator")
        return "coordinator"
    if identity.role != "coordinator":
        _record(
            settings,
            "authentication.rejected",
            identity.name,
            request,
            reason="site certificate on a coordinator endpoint",
        )
        raise HTTPException(
            403,
            f"client certificate is for site {identity.name!r}; only the "
            "coordinator may call this endpoint",
        )
    _record_success(settings, identity, request)
    return identity.name


def authenticated_participant(request: Request) -> str:
    """Return the site or "coordinator" a request comes from; else raise.

    For endpoints any participant may call, such as model downloads. In
    local mode the caller is anonymous and the result is "local".

    Raises:
        HTTPException: 401 without a client certificate.
    """
    settings = _settings(request)
    identity = peer_identity(request.scope)
    if identity is None:
        if settings.require_client_certificate:
            raise _unauthorized(request, settings, "participant")
        return "local"
    _record_success(settings, identity, request)
    return identity.name


def _settings(request: Request) -> AuthenticationSettings:
    settings = getattr(request.app.state, "authentication", None)
    # Secure by default: an app that never configured authentication
    # requires client certificates.
    return settings if settings is not None else AuthenticationSettings()


def _unauthorized(
    request: Request, settings: AuthenticationSettings, role: str
) -> HTTPException:
    _record(
        settings,
        "authentication.rejected",
        "anonymous",
        request,
        reason="no client certificate",
    )
    return HTTPException(
        401,
        f"client certificate required: connect over TLS with the {role}'s "
        "certificate from its startup kit",
    )


def _record_success(
    settings: AuthenticationSettings, identity: PeerIdentity, request: Request
) -> None:
    # Audit the first request of each certificate since the process started,
    # not every request, so the audit log records who connected without
    # growing by one entry per call.
    key = (identity.name, identity.serial_number)
    if key in settings.authenticated:
        return
    settings.authenticated.add(key)
    _record(
        settings,
        "site.authenticated"
        if identity.role == "site"
        else "coordinator.authenticated",
        identity.name,
        request,
        certificate_serial=format(identity.serial_number, "x"),
    )


def _record(
    settings: AuthenticationSettings,
    event: str,
    actor: str,
    request: Request,
    **details: Any,
) -> None:
    # The path comes from the client, so it is truncated and logged with %r.
    path = request.url.path[:200]
    logger.info("%s: actor %s, %s %r", event, actor, request.method, path)
    if settings.on_event is not None:
        settings.on_event(
            event, actor, {"method": request.method, "path": path, **details}
        )


def _forbidden(message: str) -> HTTPException:
    logger.warning("client certificate rejected: %s", message)
    return HTTPException(403, message)
