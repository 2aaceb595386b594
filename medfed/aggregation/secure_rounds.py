"""Secure aggregation inside the aggregation service's round lifecycle.

``RoundService`` calls these hooks when a study's settings choose
``secure_aggregation: masking``: opening a round opens a masking round over
the layout of the uploads (the shared model tensors and any extras groups),
an upload must carry the ``masked`` codec and joins the masking round, and
finalizing unmasks the survivors' weighted sum and applies the study's
strategy to it. The masking messages themselves travel
through ``secagg_routes``. Every failure raises ``SecureAggregationError``,
which the service turns into a 409 response that changes nothing.
"""

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from medfed.aggregation.secagg_routes import MaskingRounds, UnknownRoundError
from medfed.aggregation.secure import apply_weighted_sum
from medfed.aggregation.store import StoredUpload
from medfed.aggregation.strategies import Strategy, Weights
from medfed.contract.codecs.base import Codec
from medfed.contract.secagg import VectorLayout
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.wire import DecodedUpdate
from medfed.errors import SecureAggregationError

__all__ = [
    "accept_masked_upload",
    "finalize_masking",
    "masking_abort_reason",
    "open_masking_round",
    "parse_secure_aggregation",
]

logger = logging.getLogger(__name__)


def parse_secure_aggregation(raw: object) -> SecureAggregationConfig:
    """Read the ``secure_aggregation`` study setting; absent means ``none``.

    Raises:
        SecureAggregationError: the setting is not a valid section.
    """
    if raw is None:
        return SecureAggregationConfig()
    if isinstance(raw, str):
        raw = {"mode": raw}
    try:
        return SecureAggregationConfig.model_validate(raw)
    except ValueError as error:
        raise SecureAggregationError(
            f"invalid secure_aggregation study setting: {error}"
        ) from None


def open_masking_round(
    rounds: MaskingRounds,
    settings: SecureAggregationConfig,
    codec: Codec | None,
    study: str,
    round_number: int,
    *,
    sites: Sequence[str],
    upload_shapes: Mapping[str, Sequence[int]],
    deadline_at: float | None = None,
    opened_at: float | None = None,
) -> None:
    """Open the masking round that the service round ``round_number`` uses.

    ``codec`` is the study's codec, which selects the ring encoding: fixed
    point for None or fp32, int8 levels for int8 with a shared scale.
    ``upload_shapes`` names every tensor of a masked upload: the shared model
    tensors and the extras groups of the study's strategy.

    With ``opened_at`` and ``deadline_at`` (Unix times of the service
    round), the key exchange gets its own deadlines: advertising closes
    ``key_exchange_seconds`` after ``opened_at``, and sharing as long after
    advertising closed. Both times are saved, so a round reopened after a
    restart keeps them. Uploads keep ``deadline_at``.

    Raises:
        SecureAggregationError: the round's sites do not fit the settings
            (too few for the threshold, or an encoding that could wrap).
    """
    try:
        settings.check(len(sites), codec)
        encoding = settings.encoding(len(sites), codec)
    except ValueError as error:
        raise SecureAggregationError(
            f"round {round_number} cannot use masking: {error}"
        ) from None
    key_exchange_seconds = None
    if opened_at is not None and deadline_at is not None:
        key_exchange_seconds = settings.resolved_key_exchange_seconds(
            deadline_at - opened_at
        )
    rounds.open(
        study,
        round_number,
        sites=sites,
        threshold=settings.resolved_threshold(len(sites)),
        encoding=encoding,
        layout=VectorLayout.from_shapes(upload_shapes),
        deadline_at=deadline_at,
        opened_at=opened_at,
        key_exchange_seconds=key_exchange_seconds,
    )


def accept_masked_upload(
    rounds: MaskingRounds,
    study: str,
    round_number: int,
    decoded: DecodedUpdate,
    upload: StoredUpload | None = None,
) -> None:
    """Add a decoded ``masked`` envelope to its masking round.

    Uploads close by themselves once every site that shared keys has
    uploaded, so the survivors can reveal their shares without waiting for
    the coordinator. ``upload`` is the envelope as the upload route stores
    it: with a store, it is saved in the same transaction as the round's
    change, so the service never keeps one without the other.

    Raises:
        SecureAggregationError: the envelope is not masked with the round's
            encoding, or the masking round rejects it.
    """
    header = decoded.header
    with rounds.edit(study, round_number) as entry:
        expected = entry.server.encoding.codec_params
        if header.codec.name != "masked" or header.codec.params != expected:
            raise SecureAggregationError(
                f"envelope codec is {header.codec.name!r} with "
                f"{header.codec.params}; this round uses secure aggregation and "
                f"expects 'masked' with {expected}"
            )
        vector = entry.layout.join(decoded.tensors)
        entry.server.add_masked_update(
            header.site, vector, sample_count=header.sample_count
        )
        if upload is not None:
            entry.attach_upload(upload)
        if entry.server.uploads_complete:
            entry.server.close_uploads()


def masking_abort_reason(
    rounds: MaskingRounds, study: str, round_number: int
) -> str | None:
    """Return why the round's masking round cannot be unmasked, or None.

    A masking round that was aborted, or whose uploads are still open with
    fewer than ``threshold`` uploads, can never be unmasked. The second kind
    is aborted here, so that the sites held on its routes get the reason.
    """
    reason = rounds.abort_reason(study, round_number)
    if reason is not None:
        return reason
    try:
        with rounds.edit(study, round_number) as entry:
            server = entry.server
            uploaded = len(server.uploaded_sites)
            short = server.phase_name == "uploading" and uploaded < server.threshold
            threshold = server.threshold
    except UnknownRoundError:
        return None
    if not short:
        return None
    reason = (
        f"only {uploaded} sites uploaded masked updates, fewer than the "
        f"threshold {threshold}; nothing is unmasked"
    )
    rounds.abort(study, round_number, reason)
    return reason


def finalize_masking(
    rounds: MaskingRounds,
    study: str,
    round_number: int,
    *,
    strategy: Strategy,
    global_weights: Mapping[str, np.ndarray],
) -> tuple[Weights, list[str]]:
    """Unmask the round and apply ``strategy``; return new weights and survivors.

    If uploads are still open (a site that shared keys has not uploaded),
    they close here, and the survivors must reveal their shares before
    another call can finish the round.

    Raises:
        SecureAggregationError: the round waits for reveals, or cannot be
            unmasked.
    """
    try:
        with rounds.edit(study, round_number) as entry:
            server = entry.server
            if server.phase_name == "uploading":
                request = server.close_uploads()
                raise SecureAggregationError(
                    f"round {round_number} closed uploads with survivors "
                    f"{request.survivors} and dropped sites {request.dropped}; "
                    "finalize again once the survivors have revealed their shares"
                )
            layout = entry.layout
    except UnknownRoundError:
        raise SecureAggregationError(
            f"round {round_number} of study {study!r} has no masking round in "
            "this service process; it cannot be unmasked"
        ) from None
    result = rounds.unmask(study, round_number)
    weights = apply_weighted_sum(
        strategy,
        global_weights,
        result.weighted_sum,
        result.sample_count,
        site_count=len(result.survivors),
        layout=layout,
    )
    logger.info(
        "unmasked round %s of study %s from %s sites",
        round_number,
        study,
        len(result.survivors),
    )
    return weights, list(result.survivors)
