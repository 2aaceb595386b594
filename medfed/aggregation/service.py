"""HTTP API of the aggregation service (FastAPI, served by uvicorn).

Routes, all under ``/v1/studies/{study}``:

- ``POST ""``: create a study from a safetensors body of its initial model.
- ``GET /models/{version}`` and ``GET /models/latest``: a global model as
  safetensors, with its version and SHA-256 in response headers.
- ``POST /rounds/{round}``: open a round (sites, quorum, deadline).
- ``GET /rounds/{round}``: a round's state, never an upload's content.
- ``GET /rounds/{round}/model``: the global model the round trains from.
- ``PUT /rounds/{round}/updates/{site}``: upload a site's envelope.
- ``POST /rounds/{round}/finalize``: aggregate the round or abort it.

A rejected request gets a 4xx JSON body ``{"detail": message}`` and changes
nothing. No route returns an individual upload.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from medfed.aggregation.rounds import Rejected, RoundService
from medfed.aggregation.store import Store
from medfed.contract.ids import IDENTIFIER_PATTERN
from medfed.contract.wire import EnvelopeLimits

__all__ = ["ServiceSettings", "create_app"]

logger = logging.getLogger(__name__)

StudyId = Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN.pattern)]
SiteId = Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN.pattern)]
RoundNumber = Annotated[int, PathParam(ge=0, le=1_000_000)]


@dataclass(frozen=True)
class ServiceSettings:
    """Where the service keeps its state and what it accepts."""

    state_dir: Path
    max_upload_bytes: int = 64 * 1024 * 1024
    limits: EnvelopeLimits = field(default_factory=EnvelopeLimits)


class OpenRoundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sites: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN.pattern)]] = Field(
        min_length=1
    )
    quorum: int = Field(ge=1)
    deadline_seconds: float = Field(gt=0)


class FinalizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Sites the coordinator knows will not upload (they failed or refused).
    absent: list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN.pattern)]] = Field(
        default_factory=list
    )


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the FastAPI application over the state in ``settings.state_dir``."""
    store = Store(settings.state_dir / "aggregation.sqlite3")
    service = RoundService(store, settings.limits)
    app = FastAPI(title="medfed aggregation service", version="1")
    app.state.service = service

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, error: Rejected) -> JSONResponse:
        logger.info(
            "rejected %s %s: %s", request.method, request.url.path, error.message
        )
        return JSONResponse(
            status_code=error.status_code, content={"detail": error.message}
        )

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/studies/{study}", status_code=201)
    async def create_study(study: StudyId, request: Request) -> dict[str, Any]:
        body = await _read_body(request, settings.max_upload_bytes)
        model = await run_in_threadpool(service.create_study, study, body)
        return {"study": study, "version": model.version, "sha256": model.sha256}

    @app.get("/v1/studies/{study}/models/latest")
    def latest_model(study: StudyId) -> Response:
        return _model_response(service, study, None)

    @app.get("/v1/studies/{study}/models/{version}")
    def model(study: StudyId, version: Annotated[int, PathParam(ge=0)]) -> Response:
        return _model_response(service, study, version)

    @app.post("/v1/studies/{study}/rounds/{round_number}")
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
        return service.round_status(study, round_number)

    @app.get("/v1/studies/{study}/rounds/{round_number}/model")
    def round_model(study: StudyId, round_number: RoundNumber) -> Response:
        return _model_response(
            service, study, service.round(study, round_number).base_version
        )

    @app.get("/v1/studies/{study}/rounds/{round_number}")
    def round_status(study: StudyId, round_number: RoundNumber) -> dict[str, Any]:
        return service.round_status(study, round_number)

    @app.put("/v1/studies/{study}/rounds/{round_number}/updates/{site}")
    async def upload(
        study: StudyId, round_number: RoundNumber, site: SiteId, request: Request
    ) -> dict[str, Any]:
        body = await _read_body(request, settings.max_upload_bytes)
        stored = await run_in_threadpool(
            service.accept_upload, study, round_number, site, body
        )
        return {
            "receipt": stored.receipt,
            "study": study,
            "round": round_number,
            "site": site,
            "sha256": stored.sha256,
            "received_at": stored.received_at,
        }

    @app.post("/v1/studies/{study}/rounds/{round_number}/finalize")
    async def finalize(
        study: StudyId, round_number: RoundNumber, body: FinalizeRequest
    ) -> dict[str, Any]:
        await run_in_threadpool(
            service.finalize, study, round_number, absent=body.absent
        )
        return service.round_status(study, round_number)

    return app


def _model_response(service: RoundService, study: str, version: int | None) -> Response:
    model = service.model(study, version)
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
