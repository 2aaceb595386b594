"""HTTP API of the aggregation service (FastAPI, served by uvicorn).

Routes, all under ``/v1/studies/{study}``:

- ``POST ""``: create a study from a safetensors body of its initial model.
- ``GET ""``: the study's sites, latest model version and latest round.
- ``GET /models/{version}`` and ``GET /models/latest``: a global model as
  safetensors, with its version and SHA-256 in response headers.
- ``GET /models/{version}/published``: what the study's strategy publishes
  to sites with that model version (SCAFFOLD's server control variate), as
  safetensors with tensor names ``<group>/<name>``.
- ``POST /rounds/{round}``: open a round (sites, quorum, deadline).
- ``GET /rounds/{round}``: a round's state, never an upload's content.
- ``GET /rounds/{round}/model``: the global model the round trains from.
- ``PUT /rounds/{round}/updates/{site}``: upload a site's envelope.
- ``POST /rounds/{round}/privacy/{site}``: a site's privacy spent or its
  refusal of the round, recorded in the audit log only.
- ``POST /rounds/{round}/finalize``: aggregate the round or abort it.
- ``/rounds/{round}/secagg/...``: the masking messages of studies with
  ``secure_aggregation: masking`` (see ``secagg_routes``).
- ``GET /asynchronous``: in a study with ``asynchronous`` settings, its
  latest version, buffer and every accepted arrival (site, base version,
  staleness), never an update's content.
- ``PUT /asynchronous/{base_version}/updates/{site}``: upload a site's
  envelope trained from global version ``base_version``; every
  ``buffer_size`` arrivals publish a new version (see ``async_rounds``).
- ``POST /asynchronous/privacy/{site}``: a site's privacy spent or its
  refusal of another update, recorded in the audit log only.
- ``GET /rounds/{round}/ckks/sum``: in a study with ``secure_aggregation:
  ckks``, the encrypted sum of the round's contributors as safetensors of
  ``uint8`` ciphertexts; 425 Too Early until finalize closed uploads.
- ``PUT /rounds/{round}/ckks/decrypted/{site}``: the sum that a site
  decrypted, as an ``fp32`` envelope (see ``ckks_rounds``).

A rejected request gets a 4xx JSON body ``{"detail": message}`` and changes
nothing. No route returns an individual upload.

With an aggregation kit (deployment mode) every route but ``/health`` needs
a client certificate from the study CA. The upload route accepts only the
named site's certificate. The routes that create studies, open and finalize
rounds accept only the coordinator's, and the others any participant's. Each
upload's signature is checked against the site registry before its payload is
decoded. Every
decision that matters to an audit (uploads accepted or rejected, rounds
opened, finalized or aborted, sites withdrawn from masking rounds, model
versions registered and downloaded) is appended to the hash-chained audit
log in the state directory. When a crash comes between storing a change and
appending its audit entry, the service appends that entry, marked
``recovered``, at its next start (see ``audit_recovery``).
"""

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfed.aggregation.async_rounds import AsyncAccepted
from medfed.aggregation.audit_recovery import reconcile_audit
from medfed.aggregation.limits import ServiceLimits
from medfed.aggregation.rounds import Rejected, RoundService
from medfed.aggregation.secagg_routes import (
    create_masking_router,
    install_error_handlers,
)
from medfed.aggregation.security import (
    SecuritySettings,
    ServiceSecurity,
    install_security,
)
from medfed.aggregation.store import Store
from medfed.aggregation.tls import (
    authenticated_coordinator,
    authenticated_participant,
    authenticated_site,
)
from medfed.contract.ids import IDENTIFIER_PATTERN
from medfed.contract.wire import EnvelopeLimits

__all__ = ["ServiceSettings", "create_app"]

logger = logging.getLogger(__name__)

StudyId = Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN.pattern)]
SiteId = Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN.pattern)]
RoundNumber = Annotated[int, PathParam(ge=0, le=1_000_000)]
Version = Annotated[int, PathParam(ge=0, le=1_000_000)]


@dataclass(frozen=True)
class ServiceSettings:
    """State folder and request limits of the service."""

    state_dir: Path
    max_upload_bytes: int = 64 * 1024 * 1024
    limits: EnvelopeLimits = field(default_factory=EnvelopeLimits)
    #: The aggregation service's startup kit; None serves plain HTTP in local mode.
    kit_dir: Path | None = None
    #: Rate and concurrency limits; the body limit is ``max_upload_bytes``.
    service_limits: ServiceLimits = field(default_factory=ServiceLimits)

    def security_settings(self) -> SecuritySettings:
        return SecuritySettings(
            audit_log=self.state_dir / "audit.jsonl",
            kit_dir=self.kit_dir,
            limits=replace(self.service_limits, max_body_bytes=self.max_upload_bytes),
            envelope_limits=self.limits,
        )


class OpenRoundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sites: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN.pattern)]] = Field(
        min_length=1
    )
    quorum: int = Field(ge=1)
    deadline_seconds: float = Field(gt=0)


class FinalizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Sites that will not upload because they failed or rejected the round.
    absent: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN.pattern)]] = Field(
        default_factory=list
    )


class PrivacyReport(BaseModel):
    """A site's privacy accounting for one round, recorded in the audit log."""

    model_config = ConfigDict(extra="forbid")

    #: "spent": the site trained and reports its cumulative epsilon.
    #: "refused": the site rejected the round to stay within its budget.
    status: Literal["spent", "refused"]
    #: In an asynchronous study: the site's update number, counted from 0.
    update: int | None = Field(default=None, ge=0)
    epsilon_spent: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, strict=True
    )
    delta: float | None = Field(default=None, gt=0, lt=1, strict=True)
    message: str = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _spent_has_values(self) -> "PrivacyReport":
        # An audit entry that a site spent privacy without saying how much
        # would record a release whose cost no one can check.
        if self.status == "spent" and (
            self.epsilon_spent is None or self.delta is None
        ):
            raise ValueError(
                "a report with status 'spent' needs epsilon_spent and delta; send "
                "the site's cumulative epsilon and its delta"
            )
        return self


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the FastAPI application over the state in ``settings.state_dir``."""
    store = Store(settings.state_dir / "aggregation.sqlite3")
    # In deployment mode only /health responds without a client certificate,
    # so the OpenAPI schema and docs pages are not served.
    openapi_url = "/openapi.json" if settings.kit_dir is None else None
    app = FastAPI(
        title="medfed aggregation service", version="1", openapi_url=openapi_url
    )
    security = install_security(app, settings.security_settings())
    verifier = security.verifier
    service = RoundService(
        store,
        settings.limits,
        verify_signature=verifier,
        site_keys=None if verifier is None else verifier.site_keys,
    )
    # Before the first request: append the entries of changes that a crash
    # stored without their audit entry.
    reconcile_audit(store, security)
    app.state.service = service
    install_error_handlers(app)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, error: Rejected) -> JSONResponse:
        logger.info(
            "rejected %s %s: %s", request.method, request.url.path, error.message
        )
        return JSONResponse(
            status_code=error.status_code, content={"detail": error.message}
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(
        request: Request, error: RequestValidationError
    ) -> JSONResponse:
        # Like FastAPI's own handler, this echoes each invalid input. A NaN or
        # an infinity cannot be written as JSON, so FastAPI's handler fails
        # with a 500 on it, and this one writes such a number as a string.
        detail = _finite_json(jsonable_encoder(error.errors()))
        logger.info("rejected %s %s: invalid request", request.method, request.url.path)
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(
        "/v1/studies/{study}",
        status_code=201,
        dependencies=[Depends(authenticated_coordinator)],
    )
    async def create_study(study: StudyId, request: Request) -> dict[str, Any]:
        body = await _read_body(request, settings.max_upload_bytes)
        model, created = await run_in_threadpool(service.create_study, study, body)
        # A retried or resumed creation gets its own entry, marked duplicate,
        # so version 0 is not read as registered twice.
        await run_in_threadpool(
            security.record,
            "model.registered",
            "coordinator",
            {
                "study": study,
                "version": model.version,
                "sha256": model.sha256,
                "duplicate": not created,
            },
        )
        return {"study": study, "version": model.version, "sha256": model.sha256}

    @app.get("/v1/studies/{study}", dependencies=[Depends(authenticated_participant)])
    def study_status(study: StudyId) -> dict[str, Any]:
        return service.study_status(study)

    @app.get("/v1/studies/{study}/models/latest")
    def latest_model(study: StudyId, actor: Participant) -> Response:
        return _model_response(service, security, actor, study, None)

    @app.get("/v1/studies/{study}/models/{version}")
    def model(
        study: StudyId, version: Annotated[int, PathParam(ge=0)], actor: Participant
    ) -> Response:
        return _model_response(service, security, actor, study, version)

    @app.get(
        "/v1/studies/{study}/models/{version}/published",
        dependencies=[Depends(authenticated_participant)],
    )
    def published(study: StudyId, version: Annotated[int, PathParam(ge=0)]) -> Response:
        return Response(
            content=service.published(study, version),
            media_type="application/octet-stream",
            headers={"X-Medfed-Model-Version": str(version)},
        )

    @app.post(
        "/v1/studies/{study}/rounds/{round_number}",
        dependencies=[Depends(authenticated_coordinator)],
    )
    def open_round(
        study: StudyId, round_number: RoundNumber, body: OpenRoundRequest
    ) -> dict[str, Any]:
        service.open_round(
            study,
            round_number,
            sites=body.sites,
            quorum=body.quorum,
            deadline_seconds=body.deadline_seconds,
        )
        security.record(
            "round.opened",
            "coordinator",
            {
                "study": study,
                "round": round_number,
                "sites": body.sites,
                "quorum": body.quorum,
                "deadline_seconds": body.deadline_seconds,
            },
        )
        return service.round_status(study, round_number)

    @app.get("/v1/studies/{study}/rounds/{round_number}/model")
    def round_model(
        study: StudyId, round_number: RoundNumber, actor: Participant
    ) -> Response:
        version = service.round(study, round_number).base_version
        return _model_response(service, security, actor, study, version)

    @app.get(
        "/v1/studies/{study}/rounds/{round_number}",
        dependencies=[Depends(authenticated_participant)],
    )
    def round_status(study: StudyId, round_number: RoundNumber) -> dict[str, Any]:
        return service.round_status(study, round_number)

    @app.put(
        "/v1/studies/{study}/rounds/{round_number}/updates/{site}",
        dependencies=[Depends(authenticated_site)],
    )
    async def upload(
        study: StudyId, round_number: RoundNumber, site: SiteId, request: Request
    ) -> dict[str, Any]:
        try:
            body = await _read_body(request, settings.max_upload_bytes)
        except Rejected as error:
            await record_rejection(study, round_number, site, error)
            raise
        return await accept_envelope(study, round_number, site, body)

    async def record_rejection(
        study: str, round_number: int, site: str, error: Rejected
    ) -> None:
        details = {
            "study": study,
            "round": round_number,
            "status": error.status_code,
            "reason": error.message,
        }
        await run_in_threadpool(security.record, "update.rejected", site, details)

    async def accept_envelope(
        study: str, round_number: int, site: str, body: bytes
    ) -> dict[str, Any]:
        where = {"study": study, "round": round_number}
        try:
            stored, duplicate = await run_in_threadpool(
                service.accept_upload, study, round_number, site, body
            )
        except Rejected as error:
            await record_rejection(study, round_number, site, error)
            raise
        await run_in_threadpool(
            security.record,
            "update.accepted",
            site,
            {
                **where,
                "receipt": stored.receipt,
                "sha256": stored.sha256,
                "sample_count": stored.sample_count,
                "duplicate": duplicate,
            },
        )
        return {
            "receipt": stored.receipt,
            "study": study,
            "round": round_number,
            "site": site,
            "sha256": stored.sha256,
            "received_at": stored.received_at,
        }

    # Key, share and reveal messages of studies with secure_aggregation masking.
    # Each route also checks that a site acts only as itself and that only
    # the coordinator closes a phase or withdraws another site. A masked
    # envelope sent to the masking route goes through the same checks, store
    # and audit as an upload.
    app.include_router(
        create_masking_router(
            service.masking, masked_upload=accept_envelope, record=security.record
        ),
        dependencies=[Depends(authenticated_participant)],
    )

    @app.post(
        "/v1/studies/{study}/rounds/{round_number}/privacy/{site}",
        dependencies=[Depends(authenticated_site)],
    )
    def report_privacy(
        study: StudyId, round_number: RoundNumber, site: SiteId, body: PrivacyReport
    ) -> dict[str, Any]:
        record = service.round(study, round_number)
        if site not in record.sites:
            raise Rejected(
                403,
                f"site {site!r} does not take part in round {round_number} of "
                f"study {study!r}",
            )
        details = {
            "study": study,
            "round": round_number,
            "epsilon_spent": body.epsilon_spent,
            "delta": body.delta,
            "message": body.message,
        }
        security.record(f"privacy.{body.status}", site, details)
        return {"study": study, "round": round_number, "site": site, "recorded": True}

    @app.get(
        "/v1/studies/{study}/asynchronous",
        dependencies=[Depends(authenticated_participant)],
    )
    def asynchronous_status(study: StudyId) -> dict[str, Any]:
        return service.asynchronous.status(study)

    @app.put(
        "/v1/studies/{study}/asynchronous/{base_version}/updates/{site}",
        dependencies=[Depends(authenticated_site)],
    )
    async def asynchronous_upload(
        study: StudyId, base_version: Version, site: SiteId, request: Request
    ) -> dict[str, Any]:
        where = {"study": study, "base_version": base_version}
        try:
            body = await _read_body(request, settings.max_upload_bytes)
            accepted = await run_in_threadpool(
                service.asynchronous.accept, study, base_version, site, body
            )
        except Rejected as error:
            details = {**where, "status": error.status_code, "reason": error.message}
            await run_in_threadpool(security.record, "update.rejected", site, details)
            raise
        await run_in_threadpool(_record_arrival, security, study, accepted)
        return accepted.to_json(study)

    @app.post(
        "/v1/studies/{study}/asynchronous/privacy/{site}",
        dependencies=[Depends(authenticated_site)],
    )
    def report_asynchronous_privacy(
        study: StudyId, site: SiteId, body: PrivacyReport
    ) -> dict[str, Any]:
        study_settings, _ = service.asynchronous.settings(study)
        if site not in study_settings.sites:
            raise Rejected(403, f"site {site!r} does not take part in study {study!r}")
        details = {
            "study": study,
            "update": body.update,
            "epsilon_spent": body.epsilon_spent,
            "delta": body.delta,
            "message": body.message,
        }
        security.record(f"privacy.{body.status}", site, details)
        return {"study": study, "site": site, "recorded": True}

    @app.get("/v1/studies/{study}/rounds/{round_number}/ckks/sum")
    def encrypted_sum(
        study: StudyId, round_number: RoundNumber, actor: Participant
    ) -> Response:
        closed = service.encrypted_sum(study, round_number)
        assert closed.ciphertexts is not None
        security.record(
            "aggregate.downloaded",
            actor,
            {"study": study, "round": round_number, "sites": closed.contributors},
        )
        return Response(
            content=closed.ciphertexts,
            media_type="application/octet-stream",
            headers={
                "X-Medfed-Contributors": ",".join(closed.contributors),
                "X-Medfed-Sample-Count": str(closed.sample_count),
            },
        )

    @app.put(
        "/v1/studies/{study}/rounds/{round_number}/ckks/decrypted/{site}",
        dependencies=[Depends(authenticated_site)],
    )
    async def decrypted_sum(
        study: StudyId, round_number: RoundNumber, site: SiteId, request: Request
    ) -> dict[str, Any]:
        where = {"study": study, "round": round_number}
        try:
            body = await _read_body(request, settings.max_upload_bytes)
            closed = await run_in_threadpool(
                service.accept_decrypted_sum, study, round_number, site, body
            )
        except Rejected as error:
            details = {**where, "status": error.status_code, "reason": error.message}
            await run_in_threadpool(
                security.record, "aggregate.decryption_rejected", site, details
            )
            raise
        await run_in_threadpool(
            security.record,
            "aggregate.decrypted",
            site,
            {**where, "sha256": closed.decrypted_sha256},
        )
        return {**where, "site": site, "sha256": closed.decrypted_sha256}

    @app.post(
        "/v1/studies/{study}/rounds/{round_number}/finalize",
        dependencies=[Depends(authenticated_coordinator)],
    )
    async def finalize(
        study: StudyId, round_number: RoundNumber, body: FinalizeRequest
    ) -> dict[str, Any]:
        before = service.round(study, round_number).state
        await run_in_threadpool(
            service.finalize, study, round_number, absent=body.absent
        )
        status = service.round_status(study, round_number)
        if before == "open" and status["state"] != "open":
            await run_in_threadpool(_record_closed_round, service, security, status)
        return status

    return app


Participant = Annotated[str, Depends(authenticated_participant)]


def _finite_json(value: Any) -> Any:
    """Return ``value`` with every NaN or infinite float replaced by its string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_json(item) for item in value]
    return value


def _record_arrival(
    security: ServiceSecurity, study: str, accepted: AsyncAccepted
) -> None:
    arrival = accepted.arrival
    security.record(
        "update.accepted",
        arrival.site,
        {
            "study": study,
            "base_version": arrival.base_version,
            "staleness": arrival.staleness,
            "receipt": arrival.receipt,
            "sha256": arrival.upload.sha256,
            "sample_count": arrival.upload.sample_count,
            "duplicate": accepted.duplicate,
        },
    )
    published = accepted.published
    if published is not None:
        security.record(
            "model.registered",
            "aggregation",
            {
                "study": study,
                "version": published.version,
                "sha256": published.sha256,
                "sites": published.participants,
            },
        )


def _record_closed_round(
    service: RoundService, security: ServiceSecurity, status: dict[str, Any]
) -> None:
    study, round_number = status["study"], status["round"]
    if status["state"] == "aborted":
        security.record(
            "round.aborted",
            "coordinator",
            {"study": study, "round": round_number, "reason": status["reason"]},
        )
        return
    model = service.model(study, status["result_version"])
    security.record(
        "round.finalized",
        "coordinator",
        {"study": study, "round": round_number, "sites": status["uploaded"]},
    )
    security.record(
        "model.registered",
        "aggregation",
        {
            "study": study,
            "round": round_number,
            "version": model.version,
            "sha256": model.sha256,
        },
    )


def _model_response(
    service: RoundService,
    security: ServiceSecurity,
    actor: str,
    study: str,
    version: int | None,
) -> Response:
    model = service.model(study, version)
    security.record(
        "model.downloaded",
        actor,
        {"study": study, "version": model.version, "sha256": model.sha256},
    )
    return Response(
        content=model.weights,
        media_type="application/octet-stream",
        headers={
            "X-Medfed-Model-Version": str(model.version),
            "X-Medfed-Model-Sha256": model.sha256,
        },
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the request body, rejecting it with 413 as soon as it exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Rejected(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise Rejected(
                413,
                f"request body of {declared} bytes exceeds the limit of {limit} bytes",
            )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
