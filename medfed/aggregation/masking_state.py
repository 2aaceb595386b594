"""Durable state of the masking rounds that ``secagg_routes`` serves.

A masking round is saved as its setup (sites, threshold, encoding, layout,
deadlines) and the ordered list of changes it acknowledged: key
advertisements, phase closes, share uploads, masked uploads, withdrawals and
revealed shares. ``RecordingMaskingServer`` records each change as it
happens. After a restart, ``replay`` feeds the same changes to a fresh
server, which checks each one again, so the round continues where it
stopped. Masked vectors are read back from the envelopes the store keeps,
so no saved message contains one.

Nothing saved here is an unmasked update: the service receives only public
keys, sealed shares, masked vectors, sample counts and the shares survivors
reveal.
"""

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.aggregation.store import (
    MaskedUploadTable,
    MaskingMessage,
    SavedMaskingRound,
    StoredUpload,
)
from medfed.contract.secagg import (
    FixedPointEncoding,
    Int8RingEncoding,
    KeyAdvertisement,
    KeyRoster,
    MaskingServer,
    RevealedShares,
    RevealRequest,
    RingEncoding,
    ShareUpload,
    VectorLayout,
    parse_message,
)
from medfed.contract.wire import EnvelopeLimits, decode_envelope
from medfed.errors import ConfigError, EnvelopeError, SecureAggregationError

__all__ = [
    "MaskingRoundStore",
    "RecordingMaskingServer",
    "RoundSetup",
    "replay",
]

_SETUP_FORMAT = "medfed-masking-setup/1"
_ENCODING_KINDS: dict[str, type[FixedPointEncoding] | type[Int8RingEncoding]] = {
    "fixed_point": FixedPointEncoding,
    "int8": Int8RingEncoding,
}


class MaskingRoundStore(Protocol):
    """The part of ``medfed.aggregation.store.Store`` that masking rounds use."""

    def open_masking_round(
        self, study: str, round_number: int, setup: dict[str, Any]
    ) -> None: ...

    def append_masking_messages(
        self,
        study: str,
        round_number: int,
        first_sequence: int,
        messages: list[MaskingMessage],
        upload: StoredUpload | None = None,
        upload_table: MaskedUploadTable = "uploads",
    ) -> None: ...

    def close_masking_round(
        self, study: str, round_number: int, *, state: str, reason: str | None = None
    ) -> None: ...

    def masking_round_keys(self) -> list[tuple[str, int]]: ...

    def masking_round(
        self, study: str, round_number: int, *, with_messages: bool = True
    ) -> SavedMaskingRound | None: ...


@dataclasses.dataclass(frozen=True)
class RoundSetup:
    """The parameters that open a masking round, saved before its first message."""

    study: str
    round_number: int
    sites: tuple[str, ...]
    threshold: int
    encoding: RingEncoding
    layout: VectorLayout
    #: Unix time after which a poll closes the current phase, or None.
    deadline_at: float | None
    #: Unix time at which the service round opened, or None.
    opened_at: float | None = None
    #: Seconds that advertising (from ``opened_at``) and sharing (from the
    #: close of advertising) may each take, or None to close them at
    #: ``deadline_at`` too. Setups saved before these fields existed lack
    #: them and read as None.
    key_exchange_seconds: float | None = None

    @property
    def advertising_deadline_at(self) -> float | None:
        """Unix time after which a poll closes advertising, or None."""
        if self.opened_at is None or self.key_exchange_seconds is None:
            return None
        return self.opened_at + self.key_exchange_seconds

    def to_json(self) -> dict[str, Any]:
        kind = next(
            name
            for name, cls in _ENCODING_KINDS.items()
            if isinstance(self.encoding, cls)
        )
        assert dataclasses.is_dataclass(self.encoding)
        return {
            "format": _SETUP_FORMAT,
            "sites": list(self.sites),
            "threshold": self.threshold,
            "encoding": {"kind": kind, **dataclasses.asdict(self.encoding)},
            "layout": [[name, list(shape)] for name, shape in self.layout.shapes],
            "deadline_at": self.deadline_at,
            "opened_at": self.opened_at,
            "key_exchange_seconds": self.key_exchange_seconds,
        }

    @classmethod
    def from_json(cls, study: str, round_number: int, text: str) -> "RoundSetup":
        """Read a saved setup from its JSON text.

        Raises:
            SecureAggregationError: the setup is malformed or of another format.
        """
        try:
            raw = json.loads(text)
            if raw["format"] != _SETUP_FORMAT:
                raise SecureAggregationError(
                    f"masking round setup format {raw['format']!r} is not "
                    f"{_SETUP_FORMAT!r}"
                )
            encoding_fields = dict(raw["encoding"])
            encoding_type = _ENCODING_KINDS[encoding_fields.pop("kind")]
            deadline = raw["deadline_at"]
            return cls(
                study=study,
                round_number=round_number,
                sites=tuple(str(site) for site in raw["sites"]),
                threshold=int(raw["threshold"]),
                encoding=encoding_type(**encoding_fields),
                layout=VectorLayout(
                    tuple((str(name), tuple(shape)) for name, shape in raw["layout"])
                ),
                deadline_at=None if deadline is None else float(deadline),
                opened_at=_optional_float(raw, "opened_at"),
                key_exchange_seconds=_optional_float(raw, "key_exchange_seconds"),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as error:
            raise SecureAggregationError(
                f"masking round setup is malformed: {error!r}"
            ) from None


def _optional_float(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else float(value)


class RecordingMaskingServer(MaskingServer):
    """A ``MaskingServer`` that records each accepted change for the store.

    A site's message that is identical to one the round already accepted is
    a retry (the site did not receive the acknowledgement, for instance
    because the service restarted). It is acknowledged again and changes
    nothing, in any later phase. A different message from the same site is
    still rejected.
    """

    def __init__(self, **arguments: Any) -> None:
        super().__init__(**arguments)
        #: Changes accepted since the last save, oldest first.
        self.pending: list[MaskingMessage] = []
        #: Changes saved so far, which is the sequence number of the next one.
        self.saved_count = 0
        #: SHA-256 of each accepted masked envelope by site, to detect a retry.
        self.envelope_sha256: dict[str, str] = {}
        #: Unix time at which advertising closed, saved with the close so a
        #: restored round keeps its sharing deadline; None before then, or
        #: when a round saved without it was restored.
        self.advertising_closed_at: float | None = None
        self._accepted: dict[tuple[str, str], Any] = {}

    def add_advertisement(self, advertisement: KeyAdvertisement) -> None:
        key = ("advertisement", advertisement.site)
        if (
            self._accepted.get(key) == advertisement
            and advertisement.site not in self.withdrawn_sites
        ):
            return
        super().add_advertisement(advertisement)
        self._record(key, advertisement)

    def close_advertising(self) -> KeyRoster:
        roster = super().close_advertising()
        self.advertising_closed_at = time.time()
        body = json.dumps({"closed_at": self.advertising_closed_at})
        self.pending.append(MaskingMessage("advertising_closed", None, body))
        return roster

    def add_share_upload(self, upload: ShareUpload) -> None:
        key = ("shares", upload.sender)
        if self._accepted.get(key) == upload:
            return
        super().add_share_upload(upload)
        self._record(key, upload)

    def close_sharing(self) -> None:
        super().close_sharing()
        self.pending.append(MaskingMessage("sharing_closed"))

    def add_masked_update(
        self, site: str, vector: np.ndarray, *, sample_count: int
    ) -> None:
        # The upload routes detect a retried envelope by its SHA-256 before
        # they decode it, so a second vector here is a conflict.
        super().add_masked_update(site, vector, sample_count=sample_count)
        body = json.dumps({"sample_count": sample_count})
        self.pending.append(MaskingMessage("masked", site, body))

    def withdraw(self, site: str) -> None:
        if site in self.withdrawn_sites:
            return
        super().withdraw(site)
        self.pending.append(MaskingMessage("withdrawal", site))

    def close_uploads(self) -> RevealRequest:
        request = super().close_uploads()
        self.pending.append(MaskingMessage("uploads_closed"))
        return request

    def add_reveal(self, revealed: RevealedShares) -> None:
        key = ("reveal", revealed.site)
        if self._accepted.get(key) == revealed:
            return
        super().add_reveal(revealed)
        self._record(key, revealed)

    def mark_saved(self) -> None:
        """Note that every pending change is now in the store."""
        self.saved_count += len(self.pending)
        self.pending.clear()

    def _record(self, key: tuple[str, str], message: Any) -> None:
        self._accepted[key] = message
        body = json.dumps(message.model_dump(mode="json"), sort_keys=True)
        self.pending.append(MaskingMessage(key[0], key[1], body))


def new_server(
    setup: RoundSetup, verify_keys: Mapping[str, Ed25519PublicKey] | None = None
) -> RecordingMaskingServer:
    """Return a fresh server for ``setup``, in the advertising phase."""
    return RecordingMaskingServer(
        study=setup.study,
        round_number=setup.round_number,
        threshold=setup.threshold,
        encoding=setup.encoding,
        vector_length=setup.layout.length,
        verify_keys=verify_keys,
    )


def replay(
    saved: SavedMaskingRound,
    limits: EnvelopeLimits,
    verify_keys: Mapping[str, Ed25519PublicKey] | None = None,
) -> tuple[RoundSetup, RecordingMaskingServer]:
    """Rebuild a saved round by applying its saved changes to a fresh server.

    Every change is checked again as it is applied, so corrupted state
    raises instead of producing a wrong sum.

    Raises:
        SecureAggregationError: the setup or a message is malformed, a
            message is rejected, or a masked upload's envelope is missing or
            does not fit the round.
    """
    setup = RoundSetup.from_json(saved.study, saved.round, saved.setup)
    try:
        server = new_server(setup, verify_keys)
    except ConfigError as error:
        raise SecureAggregationError(
            f"masking round setup does not open a round: {error}"
        ) from None
    for sequence, message in enumerate(saved.messages):
        try:
            _apply(server, setup, message, saved.envelopes, limits)
        except (KeyError, TypeError, ValueError) as error:
            raise SecureAggregationError(
                f"saved message {sequence} ({message.kind}) of masking round "
                f"{saved.round} of study {saved.study!r} is malformed: {error!r}"
            ) from None
    server.mark_saved()
    return setup, server


def _apply(
    server: RecordingMaskingServer,
    setup: RoundSetup,
    message: MaskingMessage,
    envelopes: Mapping[str, bytes],
    limits: EnvelopeLimits,
) -> None:
    kind, body = message.kind, message.body
    # The routes accept messages only from the round's sites.
    if message.site is not None and message.site not in setup.sites:
        raise SecureAggregationError(
            f"saved {kind} message names site {message.site!r}, which is not "
            f"one of the round's sites {list(setup.sites)}"
        )
    if kind == "advertisement":
        server.add_advertisement(parse_message(KeyAdvertisement, body or ""))
    elif kind == "advertising_closed":
        server.close_advertising()
        # Closes saved before the time was recorded have no body.
        closed_at = None if body is None else json.loads(body)["closed_at"]
        server.advertising_closed_at = None if closed_at is None else float(closed_at)
    elif kind == "shares":
        server.add_share_upload(parse_message(ShareUpload, body or ""))
    elif kind == "sharing_closed":
        server.close_sharing()
    elif kind == "masked":
        sample_count = int(json.loads(body or "")["sample_count"])
        site = _site_of(message)
        envelope = envelopes.get(site)
        vector = _masked_vector(setup, site, envelope, limits, sample_count)
        server.add_masked_update(site, vector, sample_count=sample_count)
        assert envelope is not None
        server.envelope_sha256[site] = hashlib.sha256(envelope).hexdigest()
    elif kind == "withdrawal":
        server.withdraw(_site_of(message))
    elif kind == "uploads_closed":
        server.close_uploads()
    elif kind == "reveal":
        server.add_reveal(parse_message(RevealedShares, body or ""))
    else:
        raise SecureAggregationError(f"unknown saved masking message kind {kind!r}")


def _site_of(message: MaskingMessage) -> str:
    if message.site is None:
        raise SecureAggregationError(
            f"saved masking message of kind {message.kind!r} names no site"
        )
    return message.site


def _masked_vector(
    setup: RoundSetup,
    site: str,
    envelope: bytes | None,
    limits: EnvelopeLimits,
    sample_count: int,
) -> np.ndarray:
    if envelope is None:
        raise SecureAggregationError(
            f"the masked envelope of site {site!r} is missing from the store"
        )
    try:
        decoded = decode_envelope(envelope, limits)
    except (EnvelopeError, ConfigError) as error:
        raise SecureAggregationError(
            f"the stored masked envelope of site {site!r} is invalid: {error}"
        ) from None
    if decoded.header.codec.name != "masked":
        raise SecureAggregationError(
            f"the stored envelope of site {site!r} has codec "
            f"{decoded.header.codec.name!r}, not 'masked'"
        )
    # The upload routes accepted the envelope only with these header fields,
    # so a mismatch means the row was changed or moved since.
    header = decoded.header
    stored_as = (setup.study, setup.round_number, site, sample_count)
    found = (header.study, header.round, header.site, header.sample_count)
    if found != stored_as:
        raise SecureAggregationError(
            f"the stored masked envelope of site {site!r} has study, round, site "
            f"and sample count {found}, but the round saved {stored_as}"
        )
    return setup.layout.join(decoded.tensors)
