"""Asynchronous studies on the aggregation service: buffered, staleness-weighted.

A study created with ``asynchronous`` settings has no rounds. A site
downloads the latest global version ``v``, trains, and uploads its envelope
with ``round`` set to ``v``. The service accepts it with staleness
``latest - v``, and every ``buffer_size`` accepted arrivals it aggregates the
buffer through ``BufferedAggregator`` and the study's strategy, publishing
the next version like a synchronous round does. After ``max_versions``
versions the study takes no more uploads.

Every arrival, buffered or aggregated, is a row of the store's arrivals
table keyed by (site, base version). So a service restart keeps the buffer,
and the same upload sent again returns its first receipt and counts once.
"""

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.asynchronous import (
    BufferedAggregator,
    buffer_size_conflict,
    staleness_weight,
)
from medfed.aggregation.store import (
    Arrival,
    AsyncPublication,
    ModelVersion,
    StoredUpload,
)
from medfed.aggregation.strategies import SiteUpdate
from medfed.contract.extras import flatten_groups, split_extras
from medfed.contract.wire import decode_envelope
from medfed.errors import AggregationError

if TYPE_CHECKING:
    from medfed.aggregation.rounds import RoundService, StudySettings

__all__ = ["AsyncAccepted", "AsyncRounds", "AsyncSettings", "parse_async_settings"]

logger = logging.getLogger(__name__)

#: Strategies and wrappers that assume synchronous rounds, with the reason.
_SYNCHRONOUS_ONLY = {
    "scaffold": "scaffold updates its control variates once per synchronous round",
    "central_dp": "central_dp accounts for a sample of sites per synchronous round",
}


class AsyncSettings(BaseModel):
    """The ``asynchronous`` study setting as the service stores it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    buffer_size: int = Field(ge=1, strict=True)
    staleness_exponent: float = Field(default=0.5, ge=0, le=10)
    max_staleness: int | None = Field(default=None, ge=0, strict=True)
    #: Versions the study publishes after version 0 before it takes no more uploads.
    max_versions: int = Field(ge=1, le=100_000, strict=True)


def parse_async_settings(
    raw: object,
    *,
    sites: int,
    strategy: str,
    wrappers: list[list[Any]],
    secure_mode: str,
) -> AsyncSettings | None:
    """Validate the ``asynchronous`` study setting; None for a synchronous study.

    Raises:
        ValueError: invalid values, or a setting that needs synchronous rounds.
    """
    if raw is None:
        return None
    try:
        settings = AsyncSettings.model_validate(raw)
    except ValidationError as error:
        raise ValueError(f"invalid asynchronous study setting: {error}") from None
    if settings.buffer_size > sites:
        raise ValueError(
            f"asynchronous buffer_size {settings.buffer_size} exceeds the "
            f"{sites} sites of the study"
        )
    if secure_mode != "none":
        raise ValueError(
            f"asynchronous studies need secure_aggregation 'none', not {secure_mode!r}"
        )
    for name in [strategy, *(str(wrapper[0]) for wrapper in wrappers)]:
        if name in _SYNCHRONOUS_ONLY:
            raise ValueError(
                f"{_SYNCHRONOUS_ONLY[name]}, so it cannot run asynchronously"
            )
    conflict = buffer_size_conflict(
        settings.buffer_size, [(str(name), params) for name, params in wrappers]
    )
    if conflict is not None:
        raise ValueError(f"asynchronous {conflict}")
    return settings


@dataclass(frozen=True)
class AsyncAccepted:
    """An accepted arrival and the version it published, if it completed a buffer."""

    arrival: Arrival
    published: ModelVersion | None
    #: True when the same envelope had been accepted before and counts once.
    duplicate: bool = False

    def to_json(self, study: str) -> dict[str, Any]:
        upload = self.arrival.upload
        return {
            "receipt": self.arrival.receipt,
            "study": study,
            "site": self.arrival.site,
            "base_version": self.arrival.base_version,
            "staleness": self.arrival.staleness,
            "sha256": upload.sha256,
            "received_at": upload.received_at,
            "aggregated_version": self.arrival.aggregated_version,
            "published_version": None
            if self.published is None
            else self.published.version,
            "duplicate": self.duplicate,
        }


class AsyncRounds:
    """Arrivals and publications of asynchronous studies, over a ``RoundService``."""

    def __init__(self, service: "RoundService") -> None:
        self.service = service
        self.store = service.store
        # Serializes acceptance, so each arrival's staleness and the buffer
        # it joins are read and written without another arrival in between.
        self._lock = threading.Lock()

    def settings(self, study: str) -> tuple["StudySettings", AsyncSettings]:
        from medfed.aggregation.rounds import Rejected

        settings = self.service.settings(study)
        if settings.asynchronous is None:
            raise Rejected(
                409,
                f"study {study!r} runs synchronous rounds; upload to "
                "/rounds/{round}/updates/{site} instead",
            )
        return settings, settings.asynchronous

    def status(self, study: str) -> dict[str, Any]:
        """Describe the study's versions and arrivals, never an update's content."""
        _, asynchronous = self.settings(study)
        latest = self.store.get_model(study, None)
        assert latest is not None
        arrivals = self.store.list_arrivals(study)
        return {
            "study": study,
            "latest_version": latest.version,
            "max_versions": asynchronous.max_versions,
            "finished": latest.version >= asynchronous.max_versions,
            "buffer_size": asynchronous.buffer_size,
            "buffered": sum(1 for a in arrivals if a.aggregated_version is None),
            "arrivals": [
                {
                    "site": arrival.site,
                    "base_version": arrival.base_version,
                    "staleness": arrival.staleness,
                    "sample_count": arrival.upload.sample_count,
                    "staleness_weight": staleness_weight(
                        arrival.staleness, exponent=asynchronous.staleness_exponent
                    ),
                    "received_at": arrival.upload.received_at,
                    "aggregated_version": arrival.aggregated_version,
                }
                for arrival in arrivals
            ],
        }

    def accept(
        self, study: str, base_version: int, site: str, body: bytes
    ) -> AsyncAccepted:
        """Validate an update trained from ``base_version`` and buffer it.

        The arrival that fills the buffer aggregates it and publishes the next
        version in the same transaction. The same envelope sent again returns
        the first receipt; another envelope for the same site and base version
        is a 409. Nothing is stored unless every check passes.
        """
        from medfed.aggregation.rounds import Rejected

        settings, asynchronous = self.settings(study)
        if site not in settings.sites:
            raise Rejected(403, f"site {site!r} does not take part in study {study!r}")
        sha256 = hashlib.sha256(body).hexdigest()
        with self._lock:
            previous = self.store.get_arrival(study, site, base_version)
            if previous is not None:
                if previous.upload.sha256 == sha256:
                    return AsyncAccepted(previous, None, duplicate=True)
                raise Rejected(
                    409,
                    f"site {site!r} already uploaded a different update trained "
                    f"from version {base_version}; train from the latest version",
                )
            latest = self.store.get_model(study, None)
            assert latest is not None
            if latest.version >= asynchronous.max_versions:
                raise Rejected(
                    409,
                    f"study {study!r} has published all {asynchronous.max_versions} "
                    "versions and takes no more updates",
                )
            if base_version > latest.version:
                raise Rejected(
                    409,
                    f"version {base_version} of study {study!r} does not exist; the "
                    f"latest is {latest.version}",
                )
            staleness = latest.version - base_version
            if (
                asynchronous.max_staleness is not None
                and staleness > asynchronous.max_staleness
            ):
                raise Rejected(
                    409,
                    f"the update of site {site!r} was trained from version "
                    f"{base_version} and is {staleness} versions stale, more than "
                    f"max_staleness {asynchronous.max_staleness}; download the "
                    "latest version and train again",
                )
            upload = self._validated_upload(study, settings, base_version, site, body)
            arrival = Arrival(site, base_version, staleness, upload, None)
            buffered = self.store.list_arrivals(study, buffered_only=True)
            publication = None
            if len(buffered) + 1 >= asynchronous.buffer_size:
                publication = self._aggregate(
                    study, settings, asynchronous, latest, [*buffered, arrival]
                )
            published = self.store.add_arrival(study, arrival, publish=publication)
        stored = self.store.get_arrival(study, site, base_version)
        assert stored is not None
        logger.info(
            "accepted the update of site %s to study %s from version %d "
            "(staleness %d)%s",
            site,
            study,
            base_version,
            staleness,
            f"; published version {published.version}" if published else "",
        )
        return AsyncAccepted(stored, published)

    def _validated_upload(
        self,
        study: str,
        settings: "StudySettings",
        base_version: int,
        site: str,
        body: bytes,
    ) -> StoredUpload:
        from medfed.aggregation.rounds import Rejected

        decoded = self.service._decode(body)
        header = decoded.header
        for field, expected, actual in (
            ("study", study, header.study),
            ("round", base_version, header.round),
            ("site", site, header.site),
        ):
            if expected != actual:
                raise Rejected(
                    422,
                    f"envelope {field} is {actual!r} but the request is for {expected!r}",
                )
        if header.codec.name in ("masked", "ckks"):
            raise Rejected(
                422,
                f"envelope codec {header.codec.name!r} needs secure aggregation, "
                f"which asynchronous study {study!r} does not use",
            )
        shapes = {name: value.shape for name, value in decoded.tensors.items()}
        self.service._check_tensors(study, settings, base_version, shapes)
        return StoredUpload(
            site=site,
            sha256=hashlib.sha256(body).hexdigest(),
            nonce=header.nonce,
            sample_count=header.sample_count,
            size=len(body),
            envelope=body,
            received_at=time.time(),
        )

    def _aggregate(
        self,
        study: str,
        settings: "StudySettings",
        asynchronous: AsyncSettings,
        latest: ModelVersion,
        arrivals: list[Arrival],
    ) -> AsyncPublication:
        """Aggregate a full buffer into the next version.

        Every arrival in the buffer came while ``latest`` was the latest
        version, so replaying them into a ``BufferedAggregator`` at that
        version gives each the staleness it had on arrival.
        """
        from medfed.aggregation.rounds import Rejected, _load_weights

        full_weights, _ = _load_weights(latest.weights)
        global_weights = settings.shared_weights(full_weights)
        strategy = settings.build_strategy()
        stored = self.store.get_study(study)
        if stored is not None and stored.strategy_state:
            strategy.load_state_dict(load_safetensors(stored.strategy_state))
        aggregator = BufferedAggregator(
            strategy,
            global_weights,
            buffer_size=len(arrivals),
            staleness_exponent=asynchronous.staleness_exponent,
        )
        aggregator.version = latest.version
        published = False
        try:
            for arrival in arrivals:
                decoded = decode_envelope(arrival.upload.envelope, self.service.limits)
                delta, extras = split_extras(decoded.tensors)
                update = SiteUpdate(
                    arrival.site, delta, arrival.upload.sample_count, extras
                )
                published = aggregator.submit(update, base_version=arrival.base_version)
        except AggregationError as error:
            raise Rejected(
                409, f"aggregation of version {latest.version + 1} failed: {error}"
            ) from None
        assert published
        ordered = {
            name: np.ascontiguousarray(
                aggregator.weights[name] if name in global_weights else value,
                np.float32,
            )
            for name, value in full_weights.items()
        }
        state = strategy.state_dict()
        tensors = flatten_groups(strategy.published_tensors())
        return AsyncPublication(
            version=latest.version + 1,
            weights=save_safetensors(ordered),
            contributors=[arrival.site for arrival in arrivals],
            strategy_state=save_safetensors(state) if state else None,
            published_tensors=save_safetensors(tensors) if tensors else None,
        )
