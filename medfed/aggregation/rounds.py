"""Round logic of the aggregation service, independent of HTTP.

``RoundService`` validates every request against the stored state and raises
``Rejected`` with an HTTP status and a message when it must refuse one. A
rejected request changes nothing: checks run before any write, and each write
is a single transaction.
"""

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.async_rounds import (
    AsyncRounds,
    AsyncSettings,
    parse_async_settings,
)
from medfed.aggregation.ckks_rounds import (
    apply_decrypted_sum,
    check_encrypted_upload,
    read_decrypted_sum,
    sum_encrypted_uploads,
)
from medfed.aggregation.compatibility import build_study_strategy
from medfed.aggregation.secagg_routes import MaskingRounds
from medfed.aggregation.secure_rounds import (
    accept_masked_upload,
    finalize_masking,
    masking_abort_reason,
    open_masking_round,
    parse_secure_aggregation,
)
from medfed.aggregation.store import (
    EncryptedSum,
    ModelVersion,
    RoundRecord,
    Store,
    StoredUpload,
    UploadsClosedError,
)
from medfed.aggregation.strategies import SiteUpdate, Strategy
from medfed.contract.codecs.config import CompressionConfig
from medfed.contract.extras import (
    expected_upload_shapes,
    flatten_groups,
    split_extras,
)
from medfed.contract.ids import IDENTIFIER_PATTERN
from medfed.contract.local_layers import (
    check_local_patterns,
    is_local,
    validate_local_patterns,
)
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.secagg.layout import VectorLayout
from medfed.contract.wire import EnvelopeHeader, EnvelopeLimits, decode_envelope
from medfed.errors import (
    AggregationError,
    ConfigError,
    EnvelopeError,
    SecureAggregationError,
    SignatureError,
)

__all__ = ["Rejected", "RoundService", "StudySettings"]

logger = logging.getLogger(__name__)

SETTINGS_METADATA_KEY = "medfed_study_settings"
# Codecs that only a secure-aggregation mode may use, with that mode.
_SECURE_CODECS = {"masked": "masking", "ckks": "ckks"}


class Rejected(Exception):
    """A request the service refuses, with the HTTP status to send."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


def _reject_asynchronous(study: str, settings: "StudySettings") -> None:
    """Raise a 409 for a round request to a study that has no rounds."""
    if settings.asynchronous is not None:
        raise Rejected(
            409,
            f"study {study!r} is asynchronous and has no rounds; sites upload "
            "to /asynchronous/{base_version}/updates/{site}",
        )


@dataclass(frozen=True)
class StudySettings:
    """A study as the service stores it: its sites, strategy and secure aggregation.

    ``compression`` is the sites' codec. The service reads it only under
    masking, where the codec selects the ring encoding of the masked sum.
    """

    sites: list[str]
    strategy: str
    strategy_params: dict[str, Any]
    #: ``[name, params]`` pairs in the order the wrappers receive the updates.
    wrappers: list[list[Any]] = dataclasses.field(default_factory=list)
    secure_aggregation: SecureAggregationConfig = dataclasses.field(
        default_factory=SecureAggregationConfig
    )
    compression: CompressionConfig = dataclasses.field(
        default_factory=CompressionConfig
    )
    #: ``fnmatch`` patterns of the model tensors each site keeps local; sites
    #: never upload them and the service never changes them.
    local_layers: list[str] = dataclasses.field(default_factory=list)
    #: Buffered asynchronous aggregation in place of rounds; None for rounds.
    asynchronous: AsyncSettings | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "StudySettings":
        try:
            sites = [str(site) for site in raw["sites"]]
            strategy = str(raw["strategy"])
            params = dict(raw.get("strategy_params", {}))
            wrappers = [[str(name), dict(p)] for name, p in raw.get("wrappers", [])]
        except (KeyError, TypeError, ValueError) as error:
            raise Rejected(
                422, f"invalid study settings: missing or malformed {error}"
            ) from None
        for site in sites:
            if not IDENTIFIER_PATTERN.fullmatch(site):
                raise Rejected(
                    422, f"invalid site identifier {site!r} in study settings"
                )
        if not sites or len(set(sites)) != len(sites):
            raise Rejected(422, "study settings must list at least one site, each once")
        try:
            secure = parse_secure_aggregation(raw.get("secure_aggregation"))
        except SecureAggregationError as error:
            raise Rejected(422, str(error)) from None
        try:
            compression = CompressionConfig.model_validate(raw.get("compression") or {})
            compression.check(secure.mode)
        except ValueError as error:
            raise Rejected(422, f"invalid compression study setting: {error}") from None
        try:
            local_layers = list(validate_local_patterns(raw.get("local_layers", [])))
        except ConfigError as error:
            raise Rejected(422, f"invalid study settings: {error}") from None
        try:
            asynchronous = parse_async_settings(
                raw.get("asynchronous"),
                sites=len(sites),
                strategy=strategy,
                wrappers=wrappers,
                secure_mode=secure.mode,
            )
        except ValueError as error:
            raise Rejected(422, str(error)) from None
        return cls(
            sites=sites,
            strategy=strategy,
            strategy_params=params,
            wrappers=wrappers,
            secure_aggregation=secure,
            compression=compression,
            local_layers=local_layers,
            asynchronous=asynchronous,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "strategy": self.strategy,
            "strategy_params": self.strategy_params,
            "wrappers": self.wrappers,
            "secure_aggregation": self.secure_aggregation.model_dump(mode="json"),
            "compression": {
                "codec": self.compression.codec,
                "params": self.compression.params,
            },
            "local_layers": self.local_layers,
            "asynchronous": None
            if self.asynchronous is None
            else self.asynchronous.model_dump(mode="json"),
        }

    def build_strategy(self) -> Strategy:
        """Build the study's strategy inside its wrappers.

        Raises:
            ConfigError: an unknown name, an invalid parameter or a conflict.
        """
        return build_study_strategy(
            {
                "strategy": self.strategy,
                "strategy_params": self.strategy_params,
                "wrappers": self.wrappers,
                "total_sites": len(self.sites),
            },
            secure_aggregation=self.secure_aggregation.mode,
        )

    def shared_weights(
        self, weights: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Return the tensors of ``weights`` that sites upload: all but local layers."""
        return {
            name: value
            for name, value in weights.items()
            if not is_local(name, self.local_layers)
        }

    def upload_shapes(
        self, weights: Mapping[str, np.ndarray], strategy: Strategy
    ) -> dict[str, tuple[int, ...]]:
        """Return the name and shape of every tensor an upload must carry."""
        return expected_upload_shapes(
            self.shared_weights(weights), strategy.site_extras
        )


class RoundService:
    """Studies, rounds, uploads and aggregation on top of a ``Store``."""

    def __init__(
        self,
        store: Store,
        limits: EnvelopeLimits | None = None,
        *,
        verify_signature: Callable[[EnvelopeHeader], None] | None = None,
        site_keys: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or EnvelopeLimits()
        #: Masking rounds of studies with ``secure_aggregation: masking``,
        #: saved in ``store`` and resumed from it. With ``site_keys`` (each
        #: site's Ed25519 public key from the site registry, in deployment
        #: mode) they reject key advertisements not signed with them.
        self.masking = MaskingRounds(self.limits, store=store, verify_keys=site_keys)
        # Called on each new upload's header before its payload is decoded;
        # None (local mode) accepts unsigned envelopes.
        self.verify_signature = verify_signature
        #: Arrivals and publications of studies with ``asynchronous`` settings.
        self.asynchronous = AsyncRounds(self)
        self._restore_masking_rounds()

    def _restore_masking_rounds(self) -> None:
        """Resume the saved masking rounds of open rounds, after a restart.

        An open round of a masking study with no saved masking round (the
        service stopped between opening the two) gets a fresh one.
        """
        self.masking.restore_saved()
        for record in self.store.open_rounds():
            settings = self.settings(record.study)
            if settings.secure_aggregation.mode != "masking":
                continue
            key = (record.study, record.round)
            if self.store.masking_round(*key, with_messages=False) is not None:
                continue
            self._open_masking_round(settings, record)

    # Studies

    def create_study(self, study: str, body: bytes) -> tuple[ModelVersion, bool]:
        """Create ``study`` from a safetensors body of its initial weights.

        The body's metadata carries the study settings as JSON. Returns
        version 0 and whether this call created it. Creating a study that
        exists with the same initial weights returns version 0 again, so a
        coordinator can retry or resume. Different weights are a conflict.
        """
        weights, metadata = _load_weights(body)
        raw_settings = metadata.get(SETTINGS_METADATA_KEY)
        if raw_settings is None:
            raise Rejected(
                422, f"initial model lacks the {SETTINGS_METADATA_KEY!r} metadata"
            )
        try:
            settings = StudySettings.from_json(json.loads(raw_settings))
        except json.JSONDecodeError:
            raise Rejected(422, "study settings metadata is not valid JSON") from None
        try:
            strategy = settings.build_strategy()
            check_local_patterns(
                settings.local_layers, list(weights), model="the initial model"
            )
            settings.upload_shapes(weights, strategy)
        except (ConfigError, ValueError) as error:
            raise Rejected(422, str(error)) from None

        existing = self.store.get_study(study)
        if existing is not None:
            initial = self.store.get_model(study, 0)
            assert initial is not None
            if initial.sha256 != hashlib.sha256(body).hexdigest():
                raise Rejected(
                    409, f"study {study!r} exists with a different initial model"
                )
            return initial, False
        del weights
        logger.info("created study %s with sites %s", study, ", ".join(settings.sites))
        return self.store.create_study(study, settings.to_json(), body), True

    def settings(self, study: str) -> StudySettings:
        record = self.store.get_study(study)
        if record is None:
            raise Rejected(404, f"study {study!r} not found; create it first")
        return StudySettings.from_json(record.settings)

    def study_status(self, study: str) -> dict[str, Any]:
        """Describe a study: its sites, latest model version and latest round."""
        settings = self.settings(study)
        latest_model = self.store.get_model(study, None)
        latest_round = self.store.latest_round(study)
        assert latest_model is not None
        return {
            "study": study,
            "sites": settings.sites,
            "strategy": settings.strategy,
            "asynchronous": settings.asynchronous is not None,
            "latest_version": latest_model.version,
            "latest_round": None
            if latest_round is None
            else self.round_status(study, latest_round.round),
        }

    def model(self, study: str, version: int | None) -> ModelVersion:
        self.settings(study)
        model = self.store.get_model(study, version)
        if model is None:
            raise Rejected(404, f"model version {version} of study {study!r} not found")
        return model

    # Rounds

    def open_round(
        self,
        study: str,
        round_number: int,
        *,
        sites: Sequence[str],
        quorum: int,
        deadline_seconds: float,
    ) -> RoundRecord:
        """Open a round for ``sites``; reopening an identical open round is a no-op."""
        settings = self.settings(study)
        _reject_asynchronous(study, settings)
        unknown = sorted(set(sites) - set(settings.sites))
        if unknown:
            raise Rejected(
                422, f"sites {', '.join(unknown)} are not part of study {study!r}"
            )
        if not sites or len(set(sites)) != len(sites):
            raise Rejected(422, "a round needs at least one site, each listed once")
        if not 1 <= quorum <= len(sites):
            raise Rejected(422, f"quorum {quorum} must be between 1 and {len(sites)}")
        if not deadline_seconds > 0:
            raise Rejected(422, f"deadline_seconds must be > 0, got {deadline_seconds}")

        existing = self.store.get_round(study, round_number)
        if existing is not None:
            if existing.state == "open" and existing.sites == list(sites):
                return existing
            raise Rejected(
                409,
                f"round {round_number} of study {study!r} is already {existing.state}",
            )
        latest = self.store.latest_round(study)
        if latest is not None:
            if latest.state == "open":
                raise Rejected(
                    409, f"round {latest.round} of study {study!r} is still open"
                )
            if round_number != latest.round + 1:
                raise Rejected(
                    409,
                    f"the next round of study {study!r} is {latest.round + 1}, not {round_number}",
                )
        elif round_number != 0:
            raise Rejected(
                409, f"the first round of study {study!r} is 0, not {round_number}"
            )
        masking = settings.secure_aggregation.mode == "masking"
        if settings.secure_aggregation.mode != "none":
            try:
                settings.secure_aggregation.check(
                    len(sites), settings.compression.build_codec()
                )
                if masking:
                    settings.secure_aggregation.check_key_exchange_deadline(
                        deadline_seconds
                    )
            except ConfigError as error:
                raise Rejected(422, str(error)) from None
        record = self.store.open_round(
            study, round_number, list(sites), quorum, time.time() + deadline_seconds
        )
        if masking:
            self._open_masking_round(settings, record)
        logger.info(
            "opened round %d of study %s for %d sites", round_number, study, len(sites)
        )
        return record

    def _open_masking_round(self, settings: StudySettings, record: RoundRecord) -> None:
        base = self.store.get_model(record.study, record.base_version)
        assert base is not None
        open_masking_round(
            self.masking,
            settings.secure_aggregation,
            settings.compression.build_codec(),
            record.study,
            record.round,
            sites=record.sites,
            upload_shapes=settings.upload_shapes(
                _load_weights(base.weights)[0], settings.build_strategy()
            ),
            deadline_at=record.deadline_at,
            opened_at=record.opened_at,
        )

    def round(self, study: str, round_number: int) -> RoundRecord:
        _reject_asynchronous(study, self.settings(study))
        record = self.store.get_round(study, round_number)
        if record is None:
            raise Rejected(404, f"round {round_number} of study {study!r} not found")
        return record

    def round_status(self, study: str, round_number: int) -> dict[str, Any]:
        """Describe a round without revealing any upload's content.

        In a CKKS study the status also has ``ckks``: the ``phase``
        (``uploading``, ``decrypting`` while the service waits for a site to
        decrypt the sum, or ``decrypted``), the ``contributors`` in the sum
        and their total ``sample_count``. In a masking study it has
        ``masking``: the phase of the round's masking round and the sites
        that answered each phase (``MaskingRounds.progress``), or None once
        the round was unmasked.
        """
        record = self.round(study, round_number)
        status = {
            "study": study,
            "round": round_number,
            "state": record.state,
            "sites": record.sites,
            "uploaded": self.store.uploaded_sites(study, round_number),
            "quorum": record.quorum,
            "deadline_in_seconds": max(0.0, record.deadline_at - time.time()),
            "base_version": record.base_version,
            "result_version": record.result_version,
            "reason": record.reason,
        }
        mode = self.settings(study).secure_aggregation.mode
        if mode == "ckks":
            closed = self.store.get_encrypted_sum(study, round_number)
            phase = "uploading"
            if closed is not None:
                phase = "decrypting" if closed.decrypted is None else "decrypted"
            status["ckks"] = {
                "phase": phase,
                "contributors": [] if closed is None else closed.contributors,
                "sample_count": 0 if closed is None else closed.sample_count,
            }
        if mode == "masking":
            status["masking"] = self.masking.progress(study, round_number)
        return status

    # Uploads

    def accept_upload(
        self, study: str, round_number: int, site: str, body: bytes
    ) -> tuple[StoredUpload, bool]:
        """Validate an envelope and store it; return the stored upload.

        Also returns whether the envelope is a retry. The same envelope sent
        again returns the first receipt and counts once. A different envelope for a (site, round) that has one is a 409.
        In a masking study the envelope must carry the ``masked`` codec and
        also joins the round's masking round.
        """
        settings = self.settings(study)
        record = self.round(study, round_number)
        if site not in record.sites:
            raise Rejected(
                403,
                f"site {site!r} does not take part in round {round_number} of study {study!r}",
            )
        sha256 = hashlib.sha256(body).hexdigest()
        previous = self.store.get_upload(study, round_number, site)
        if previous is not None:
            if previous.sha256 == sha256:
                return previous, True
            raise Rejected(
                409,
                f"site {site!r} already uploaded a different update for round {round_number}",
            )
        if record.state != "open":
            raise Rejected(
                409,
                f"round {round_number} of study {study!r} is {record.state}; uploads are closed",
            )

        decoded = self._decode(body)
        header = decoded.header
        for field, expected, actual in (
            ("study", study, header.study),
            ("round", round_number, header.round),
            ("site", site, header.site),
        ):
            if expected != actual:
                raise Rejected(
                    422,
                    f"envelope {field} is {actual!r} but the request is for {expected!r}",
                )
        mode = settings.secure_aggregation.mode
        needed_mode = _SECURE_CODECS.get(header.codec.name)
        if needed_mode is not None and needed_mode != mode:
            raise Rejected(
                422,
                f"envelope codec {header.codec.name!r} needs secure_aggregation "
                f"{needed_mode!r}, but study {study!r} uses {mode!r}",
            )
        if mode == "ckks":
            # The payload contains ciphertexts, so the header's tensor list is
            # what describes the update's layout.
            shapes = {tensor.name: tuple(tensor.shape) for tensor in header.tensors}
            layout = self._check_tensors(study, settings, record.base_version, shapes)
            try:
                check_encrypted_upload(settings.secure_aggregation, decoded, layout)
            except SecureAggregationError as error:
                raise Rejected(422, str(error)) from None
        else:
            shapes = {name: value.shape for name, value in decoded.tensors.items()}
            self._check_tensors(study, settings, record.base_version, shapes)

        upload = StoredUpload(
            site=site,
            sha256=sha256,
            nonce=header.nonce,
            sample_count=header.sample_count,
            size=len(body),
            envelope=body,
            received_at=time.time(),
        )
        if mode == "masking":
            # Stores the upload in one transaction with the masking change.
            accept_masked_upload(self.masking, study, round_number, decoded, upload)
        else:
            try:
                self.store.add_upload(study, round_number, upload)
            except UploadsClosedError as error:
                raise Rejected(409, str(error)) from None
        logger.info(
            "accepted upload of site %s for round %d of study %s",
            site,
            round_number,
            study,
        )
        return upload, False

    def _decode(self, body: bytes) -> Any:
        try:
            return decode_envelope(
                body, self.limits, verify_signature=self.verify_signature
            )
        except SignatureError as error:
            raise Rejected(403, f"invalid update envelope: {error}") from None
        except (EnvelopeError, ConfigError) as error:
            raise Rejected(400, f"invalid update envelope: {error}") from None

    def _check_tensors(
        self,
        study: str,
        settings: StudySettings,
        version: int,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> VectorLayout:
        """Reject an upload whose tensors differ from what the study expects.

        An upload carries the model's tensors minus the study's local layers,
        plus one tensor per shared tensor for each extras group of the
        strategy (``medfed.contract.extras``). Returns the upload's layout.
        """
        model = self.store.get_model(study, version)
        assert model is not None
        weights, _ = _load_weights(model.weights)
        expected = settings.upload_shapes(weights, settings.build_strategy())
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        if missing or extra:
            local = sorted(set(extra) & set(weights))
            hint = (
                f"; tensors {local} are local layers of this study and must not "
                "be uploaded"
                if local
                else ""
            )
            raise Rejected(
                422,
                f"update tensors do not match the model: missing {missing or 'none'}, "
                f"unexpected {extra or 'none'}{hint}",
            )
        for name, shape in shapes.items():
            if tuple(shape) != tuple(expected[name]):
                raise Rejected(
                    422,
                    f"update tensor {name!r} has shape {list(shape)}, "
                    f"expected {list(expected[name])}",
                )
        return VectorLayout.from_shapes(expected)

    # CKKS rounds

    def encrypted_sum(self, study: str, round_number: int) -> EncryptedSum:
        """Return the round's encrypted sum once its uploads have closed.

        Raises:
            Rejected: 409 if the study does not use CKKS, 425 Too Early while
                uploads are open, 404 for an unknown study or round.
        """
        record = self.round(study, round_number)
        self._require_ckks(study)
        closed = self.store.get_encrypted_sum(study, round_number)
        if closed is None or closed.ciphertexts is None:
            raise Rejected(
                425,
                f"round {round_number} of study {study!r} has no encrypted sum yet: "
                f"its uploads close when the coordinator finalizes it "
                f"(state {record.state})",
            )
        return closed

    def accept_decrypted_sum(
        self, study: str, round_number: int, site: str, body: bytes
    ) -> EncryptedSum:
        """Store the sum that ``site`` decrypted; return the round's sum record.

        The same envelope sent again is accepted again; a different one after
        a sum was stored is a 409. Nothing is stored unless every check passes.
        """
        settings = self._require_ckks(study)
        record = self.round(study, round_number)
        if site not in record.sites:
            raise Rejected(
                403,
                f"site {site!r} does not take part in round {round_number} of study {study!r}",
            )
        closed = self.encrypted_sum(study, round_number)
        sha256 = hashlib.sha256(body).hexdigest()
        if closed.decrypted is not None:
            if closed.decrypted_sha256 == sha256:
                return closed
            raise Rejected(
                409,
                f"round {round_number} already has the sum that site "
                f"{closed.decrypted_by!r} decrypted",
            )
        if record.state != "open":
            raise Rejected(
                409, f"round {round_number} of study {study!r} is {record.state}"
            )
        decoded = self._decode(body)
        header = decoded.header
        for field, expected, actual in (
            ("study", study, header.study),
            ("round", round_number, header.round),
            ("site", site, header.site),
        ):
            if expected != actual:
                raise Rejected(
                    422,
                    f"envelope {field} is {actual!r} but the request is for {expected!r}",
                )
        shapes = {name: value.shape for name, value in decoded.tensors.items()}
        layout = self._check_tensors(study, settings, record.base_version, shapes)
        try:
            read_decrypted_sum(settings.secure_aggregation, decoded, closed, layout)
        except SecureAggregationError as error:
            raise Rejected(422, str(error)) from None
        if not self.store.set_decrypted_sum(study, round_number, site, body):
            return self.accept_decrypted_sum(study, round_number, site, body)
        logger.info(
            "accepted the sum of round %d of study %s decrypted by site %s",
            round_number,
            study,
            site,
        )
        stored = self.store.get_encrypted_sum(study, round_number)
        assert stored is not None
        return stored

    def _require_ckks(self, study: str) -> StudySettings:
        settings = self.settings(study)
        if settings.secure_aggregation.mode != "ckks":
            raise Rejected(
                409,
                f"study {study!r} uses secure_aggregation "
                f"{settings.secure_aggregation.mode!r}, not 'ckks'",
            )
        return settings

    def _close_encrypted_uploads(
        self, settings: StudySettings, record: RoundRecord
    ) -> EncryptedSum:
        """Close a CKKS round's uploads and add their ciphertexts, once."""
        study, round_number = record.study, record.round
        closed = self.store.close_encrypted_uploads(study, round_number)
        if closed.ciphertexts is None:
            base = self.store.get_model(study, record.base_version)
            assert base is not None
            layout = VectorLayout.of(_load_weights(base.weights)[0])
            uploads = [
                upload
                for upload in self.store.list_uploads(study, round_number)
                if upload.site in closed.contributors
            ]
            try:
                ciphertexts = sum_encrypted_uploads(
                    settings.secure_aggregation, uploads, layout, self.limits
                )
            except SecureAggregationError as error:
                raise Rejected(
                    409,
                    f"adding the ciphertexts of round {round_number} failed: {error}",
                ) from None
            self.store.set_encrypted_sum(study, round_number, ciphertexts)
            logger.info(
                "closed uploads of round %d of study %s; the encrypted sum of %d "
                "sites waits for a site to decrypt it",
                round_number,
                study,
                len(closed.contributors),
            )
            summed = self.store.get_encrypted_sum(study, round_number)
            assert summed is not None
            return summed
        return closed

    # Finalization

    def finalize(
        self, study: str, round_number: int, *, absent: Sequence[str] = ()
    ) -> RoundRecord:
        """Aggregate a round into a new global model version, or abort it.

        The round closes when every site has uploaded, or every site that has
        not is named in ``absent`` (the coordinator has learned that it will not upload),
        or the deadline has passed. It then needs ``quorum`` uploads, else it
        is aborted and the previous global model stays current. A round whose
        masking round was aborted is aborted at once.

        In a CKKS study the first call that meets the quorum closes uploads,
        adds the ciphertexts and returns the round still open, in phase
        ``decrypting``. Once a site has sent the decrypted sum, the next call
        applies the strategy to it.
        """
        settings = self.settings(study)
        record = self.round(study, round_number)
        if record.state != "open":
            return record
        uploads = self.store.list_uploads(study, round_number)
        closed = None
        if settings.secure_aggregation.mode == "ckks":
            closed = self.store.get_encrypted_sum(study, round_number)
        if settings.secure_aggregation.mode == "masking":
            # An aborted masking round can never be unmasked, so waiting for
            # the sites or the deadline cannot save the round.
            masking_reason = self.masking.abort_reason(study, round_number)
            if masking_reason is not None:
                return self._abort_unmaskable(record, masking_reason)
        waiting = sorted(set(record.sites) - {u.site for u in uploads} - set(absent))
        if closed is None and waiting and time.time() < record.deadline_at:
            raise Rejected(
                409,
                f"round {round_number} still waits for sites {', '.join(waiting)} until its "
                f"deadline in {record.deadline_at - time.time():.0f} s",
            )
        if closed is None and len(uploads) < record.quorum:
            reason = (
                f"round {round_number} of study {study!r} has {len(uploads)} updates, fewer "
                f"than its quorum of {record.quorum}; the global model stays at version "
                f"{record.base_version}"
            )
            self.store.close_round(study, round_number, state="aborted", reason=reason)
            logger.warning(
                "aborted round %d of study %s: %s", round_number, study, reason
            )
            if settings.secure_aggregation.mode == "masking":
                # Sites waiting on the masking routes get the reason at once.
                self.masking.abort(study, round_number, reason)
            return self.round(study, round_number)

        if settings.secure_aggregation.mode == "masking":
            masking_reason = masking_abort_reason(self.masking, study, round_number)
            if masking_reason is not None:
                return self._abort_unmaskable(record, masking_reason)

        if settings.secure_aggregation.mode == "ckks":
            closed = self._close_encrypted_uploads(settings, record)
            if closed.decrypted is None:
                return record

        aggregated = self._aggregate(study, settings, record, uploads, closed)
        self.store.close_round(
            study,
            round_number,
            state="finalized",
            model=(aggregated.weights, aggregated.contributors),
            strategy_state=aggregated.strategy_state,
            published_tensors=aggregated.published_tensors,
        )
        logger.info(
            "finalized round %d of study %s with %d updates",
            round_number,
            study,
            len(aggregated.contributors),
        )
        return self.round(study, round_number)

    def _abort_unmaskable(
        self, record: RoundRecord, masking_reason: str
    ) -> RoundRecord:
        """Abort a round whose masking round cannot be unmasked; keep the model."""
        study, round_number = record.study, record.round
        reason = (
            f"round {round_number} of study {study!r} cannot be unmasked: "
            f"{masking_reason}; the global model stays at version "
            f"{record.base_version}"
        )
        self.store.close_round(study, round_number, state="aborted", reason=reason)
        logger.warning("aborted round %d of study %s: %s", round_number, study, reason)
        return self.round(study, round_number)

    def published(self, study: str, version: int) -> bytes:
        """Return the tensors published with model ``version`` as safetensors.

        Tensor ``<group>/<name>`` is tensor ``<name>`` of the group (SCAFFOLD's
        ``control_variate``). A version with nothing published, such as the
        initial model, returns a file without tensors.
        """
        self.model(study, version)
        stored = self.store.get_published(study, version)
        return stored if stored is not None else save_safetensors({})

    def _aggregate(
        self,
        study: str,
        settings: StudySettings,
        record: RoundRecord,
        uploads: list[StoredUpload],
        closed: EncryptedSum | None = None,
    ) -> "_Aggregated":
        """Aggregate a round's uploads into the next model version.

        The strategy receives only the shared tensors; local layers keep the base
        model's values. ``closed`` is a CKKS round's decrypted sum.
        """
        base = self.store.get_model(study, record.base_version)
        assert base is not None
        full_weights, _ = _load_weights(base.weights)
        global_weights = settings.shared_weights(full_weights)
        strategy = settings.build_strategy()
        stored = self.store.get_study(study)
        if stored is not None and stored.strategy_state:
            # Strategy state is the service's own float64 record (moments,
            # accountant history), not a model, so it skips the model checks.
            strategy.load_state_dict(load_safetensors(stored.strategy_state))
        contributors = [upload.site for upload in uploads]
        try:
            if settings.secure_aggregation.mode == "masking":
                new_weights, contributors = finalize_masking(
                    self.masking,
                    study,
                    record.round,
                    strategy=strategy,
                    global_weights=global_weights,
                )
            elif closed is not None:
                new_weights = apply_decrypted_sum(
                    strategy,
                    global_weights,
                    settings.secure_aggregation,
                    closed,
                    VectorLayout.of(global_weights),
                    self.limits,
                )
                contributors = closed.contributors
            else:
                updates = []
                for upload in uploads:
                    decoded = decode_envelope(upload.envelope, self.limits)
                    delta, extras = split_extras(decoded.tensors)
                    updates.append(
                        SiteUpdate(upload.site, delta, upload.sample_count, extras)
                    )
                new_weights = strategy.aggregate(global_weights, updates)
        except AggregationError as error:
            raise Rejected(
                409, f"aggregation of round {record.round} failed: {error}"
            ) from None
        ordered = {
            name: np.ascontiguousarray(
                new_weights[name] if name in global_weights else value, np.float32
            )
            for name, value in full_weights.items()
        }
        state = strategy.state_dict()
        published = flatten_groups(strategy.published_tensors())
        return _Aggregated(
            weights=save_safetensors(ordered),
            strategy_state=save_safetensors(state) if state else None,
            published_tensors=save_safetensors(published) if published else None,
            contributors=contributors,
        )


@dataclass(frozen=True)
class _Aggregated:
    """A round's aggregation result, as the store keeps it (safetensors bytes)."""

    weights: bytes
    strategy_state: bytes | None
    published_tensors: bytes | None
    contributors: list[str]


def _load_weights(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors body into arrays and its metadata."""
    try:
        weights = load_safetensors(body)
        metadata = _safetensors_metadata(body)
    except (SafetensorError, ValueError) as error:
        raise Rejected(
            400, f"model body is not a valid safetensors file: {error}"
        ) from None
    for name, value in weights.items():
        if value.dtype != np.float32:
            raise Rejected(
                422, f"model tensor {name!r} has dtype {value.dtype}, expected float32"
            )
        if not np.isfinite(value).all():
            raise Rejected(
                422, f"model tensor {name!r} contains NaN or infinite values"
            )
    return weights, metadata


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    header_length = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + header_length])
    metadata = header.get("__metadata__", {})
    return {str(key): str(value) for key, value in metadata.items()}
