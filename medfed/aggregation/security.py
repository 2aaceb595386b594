"""One place that wires authentication, limits, signatures and audit into the service.

``install_security`` configures a FastAPI app and returns a
``ServiceSecurity`` that the service's handlers use:

- ``security.decode_upload(data)`` checks an envelope's header, then its
  signature against the site registry, and only then decompresses and
  decodes it;
- ``security.record(event, actor, details)`` appends to the audit log and
  rewrites the signed head next to it;
- ``security.uvicorn_options()`` returns the TLS and concurrency options
  for ``uvicorn.Config``.

Site endpoints take ``Depends(authenticated_site)`` and coordinator
endpoints ``Depends(authenticated_coordinator)`` (both from
``medfed.aggregation.tls``).
"""

import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from medfed.aggregation.audit import AUDIT_EVENTS, AuditLog
from medfed.aggregation.limits import (
    ServiceLimits,
    install_limits,
    uvicorn_limit_options,
)
from medfed.aggregation.tls import (
    AuthenticationSettings,
    configure_authentication,
    uvicorn_tls_options,
)
from medfed.contract.kits import KitFiles
from medfed.contract.signing import Ed25519Signer, SignatureVerifier
from medfed.contract.wire import DecodedUpdate, EnvelopeLimits, decode_envelope
from medfed.errors import ConfigError

__all__ = [
    "KILL_BEFORE_AUDIT_VARIABLE",
    "SecuritySettings",
    "ServiceSecurity",
    "install_security",
]

logger = logging.getLogger(__name__)

#: Test-only environment variable. Set to an audit event, optionally with
#: ``:N``, it makes the service kill itself with SIGKILL just before it
#: appends the N-th entry (the first by default) of that event, after the
#: change was committed. When it is unset, as in production, nothing changes.
KILL_BEFORE_AUDIT_VARIABLE = "MEDFED_TEST_KILL_BEFORE_AUDIT"


@dataclass(frozen=True, kw_only=True)
class SecuritySettings:
    """Security configuration of one aggregation service.

    Attributes:
        audit_log: path of the audit log (JSON lines); the signed head is
            written beside it as ``<name>.head.json``.
        kit_dir: the aggregation service's startup kit. With it the service
            requires mTLS client certificates, verifies every envelope's
            signature and signs its audit head. Without it (local mode) the
            service serves plain HTTP on loopback and accepts unsigned
            envelopes.
        limits: body-size, rate and concurrency limits.
        envelope_limits: size limits of the envelope decoder.
    """

    audit_log: Path
    kit_dir: Path | None = None
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    envelope_limits: EnvelopeLimits = field(default_factory=EnvelopeLimits)

    def __post_init__(self) -> None:
        if self.kit_dir is not None:
            missing = [
                name
                for name in (
                    KitFiles.CA_CERT,
                    KitFiles.TLS_CERT,
                    KitFiles.TLS_KEY,
                    KitFiles.SITE_REGISTRY,
                    KitFiles.AUDIT_SIGNING_KEY,
                )
                if not (Path(self.kit_dir) / name).is_file()
            ]
            if missing:
                raise ConfigError(
                    f"aggregation kit {self.kit_dir} is missing {missing}: pass the "
                    "'aggregation' directory that medfed provision wrote"
                )


class ServiceSecurity:
    """The security state of one running service process."""

    def __init__(self, settings: SecuritySettings) -> None:
        self.settings = settings
        self.deployment = settings.kit_dir is not None
        self.verifier: SignatureVerifier | None = None
        self.head_signer: Ed25519Signer | None = None
        if settings.kit_dir is not None:
            kit = Path(settings.kit_dir)
            self.verifier = SignatureVerifier.from_registry(
                kit / KitFiles.SITE_REGISTRY
            )
            self.head_signer = Ed25519Signer.from_file(kit / KitFiles.AUDIT_SIGNING_KEY)
        self.audit = AuditLog(settings.audit_log)
        self.head_path = Path(settings.audit_log).with_name(
            Path(settings.audit_log).name + ".head.json"
        )
        # Handlers record from many threads; one lock keeps each append and
        # the signed head that follows it in step.
        self._lock = threading.Lock()
        self._kill_before = _kill_before_audit_setting()
        self._counts: dict[str, int] = {}

    def record(
        self, event: str, actor: str, details: Mapping[str, Any] | None = None
    ) -> None:
        """Append an audit entry and, in deployment mode, rewrite the signed head."""
        with self._lock:
            if self._kill_before is not None:
                self._kill_if_requested(event)
            self.audit.append(event, actor, details)
            if self.head_signer is not None:
                signed = self.audit.sign_head(self.head_signer)
                temporary = self.head_path.with_name(self.head_path.name + ".tmp")
                temporary.write_text(json.dumps(signed) + "\n", encoding="utf-8")
                os.replace(temporary, self.head_path)

    def _kill_if_requested(self, event: str) -> None:
        """Kill this process with SIGKILL before the requested audit entry.

        Tests use it to simulate a crash between a committed change and its
        audit entry, as ``KILL_BEFORE_AUDIT_VARIABLE`` describes.
        """
        assert self._kill_before is not None
        target, occurrence = self._kill_before
        if event != target:
            return
        self._counts[event] = self._counts.get(event, 0) + 1
        if self._counts[event] == occurrence:
            logger.warning(
                "%s is set: killing the service before audit entry %s number %d",
                KILL_BEFORE_AUDIT_VARIABLE,
                event,
                occurrence,
            )
            os.kill(os.getpid(), signal.SIGKILL)

    def decode_upload(self, data: bytes) -> DecodedUpdate:
        """Decode an uploaded envelope, verifying its signature before decoding.

        Raises:
            EnvelopeError: the envelope is malformed or oversized.
            SignatureError: (deployment mode) the signature is missing or wrong.
            ConfigError: the header names an unknown codec or invalid params.
        """
        return decode_envelope(
            data, self.settings.envelope_limits, verify_signature=self.verifier
        )

    def uvicorn_options(self) -> dict[str, Any]:
        options = uvicorn_limit_options(self.settings.limits)
        if self.settings.kit_dir is not None:
            options.update(uvicorn_tls_options(Path(self.settings.kit_dir)))
        return options

    def close(self) -> None:
        self.audit.close()


def _kill_before_audit_setting() -> tuple[str, int] | None:
    """Parse ``KILL_BEFORE_AUDIT_VARIABLE`` as ``EVENT`` or ``EVENT:N``."""
    value = os.environ.get(KILL_BEFORE_AUDIT_VARIABLE)
    if not value:
        return None
    event, _, number = value.partition(":")
    number = number or "1"
    if event not in AUDIT_EVENTS or not number.isdigit() or int(number) < 1:
        raise ConfigError(
            f"invalid {KILL_BEFORE_AUDIT_VARIABLE} {value!r}: use an audit event "
            "and an optional ':N' occurrence of 1 or more, such as "
            "'update.accepted:2', or unset it outside tests"
        )
    logger.warning(
        "%s=%s is set: the service will kill itself before that audit entry; "
        "unset it outside tests",
        KILL_BEFORE_AUDIT_VARIABLE,
        value,
    )
    return event, int(number)


def install_security(app: FastAPI, settings: SecuritySettings) -> ServiceSecurity:
    """Configure authentication and limits on ``app``; return the security state.

    Stores the state as ``app.state.security`` and records ``service.started``.
    """
    security = ServiceSecurity(settings)
    configure_authentication(
        app,
        AuthenticationSettings(
            require_client_certificate=security.deployment,
            on_event=security.record,
        ),
    )
    # In local mode every site shares the loopback address, so a per-client
    # rate limit would throttle the whole study as one client.
    install_limits(app, settings.limits, rate_limit=security.deployment)
    app.state.security = security
    security.record(
        "service.started",
        "aggregation",
        {
            "mode": "deployment" if security.deployment else "local",
            "registered_sites": security.verifier.sites if security.verifier else [],
        },
    )
    if not security.deployment:
        logger.warning(
            "aggregation service in local mode: no TLS, no client certificates, "
            "unsigned envelopes accepted; bind it to 127.0.0.1 only"
        )
    return security
