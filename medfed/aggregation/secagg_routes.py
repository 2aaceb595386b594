"""HTTP routes of a masking round, to mount on the aggregation service.

All routes are under ``/v1/studies/{study}/rounds/{round}/secagg``:

- ``POST /keys``: a site's ``KeyAdvertisement``. Advertising closes by itself
  once every site of the round has advertised or withdrawn, or by
  ``POST /keys/close``. With verify keys (deployment mode), an advertisement
  that is unsigned or not signed with the site's registered key gets 409.
- ``GET /roster``: the ``KeyRoster``, 425 until advertising closed.
- ``POST /shares``: a site's ``ShareUpload``. Sharing closes by itself once
  every roster site has uploaded or withdrawn, or by ``POST /shares/close``.
- ``GET /shares/{site}``: the encrypted shares relayed to ``site``.
- ``PUT /masked/{site}``: a site's envelope with the ``masked`` codec. The
  aggregation service passes it to its own upload route's checks; a router
  without ``masked_upload`` adds it to the masking round itself.
  Uploads close by themselves once every site that shared keys uploaded or
  withdrew.
- ``POST /withdrawals/{site}``: ``site`` will not upload this round. The
  site sends it itself, or the coordinator sends it (with the JSON body
  ``{"requested_by": "coordinator"}``) for a site that died without doing
  so. The current phase then closes without waiting for the site, and a
  withdrawal that leaves fewer than ``threshold`` sites able to upload
  aborts the round. A withdrawal after the site's upload gets 409.
- ``POST /uploads/close``: end uploads; returns the ``RevealRequest``.
- ``GET /reveal-request``: the ``RevealRequest``, 425 until uploads closed.
- ``POST /reveals``: a survivor's ``RevealedShares``.

A message the round rejects gets a 409 JSON body ``{"detail": message}`` and
changes nothing. A site's message identical to one the round already
accepted is a retry: it gets the same response again and changes nothing.
With a store, a change is acknowledged only once it is saved, and a change
the service could not save gets 503, so the site sends it again. Every request for a round that the service aborted gets 409
with the reason. A request that comes before its phase (the roster before
advertising closed) gets 425 Too Early, so sites poll. A poll after the
round's deadline closes the pending phase, and for advertising and sharing
so does a poll after their own, earlier deadlines. A phase that cannot
close with the sites that sent their message (too few of them) aborts the
round. An unknown round gets 404. The routes never return a masked
vector or a revealed share. The service unmasks with ``MaskingRounds.unmask``
when it finalizes the round.

The three GET routes take an optional query parameter ``wait`` (seconds, at
least 0, capped at ``MaskingRounds.max_wait_seconds``). With it, a request
that comes before its phase is held until the round changes phase, is
aborted, or reaches its phase's deadline, or until ``wait`` seconds pass, and only
then gets 425. A held request waits on the event loop and occupies no
threadpool thread. Without ``wait``, the service responds at once.
"""

import asyncio
import dataclasses
import hashlib
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from medfed.aggregation.masking_state import (
    MaskingRoundStore,
    RecordingMaskingServer,
    RoundSetup,
    new_server,
    replay,
)
from medfed.aggregation.store import MaskedUploadTable, StoredUpload
from medfed.aggregation.tls import peer_identity
from medfed.contract.ids import IDENTIFIER_PATTERN, validate_identifier
from medfed.contract.kits import KitFiles
from medfed.contract.secagg import (
    MIN_SITES,
    AdvertisementSignatureError,
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    RevealedShares,
    RevealRequest,
    RingEncoding,
    RoundNotReadyError,
    ShareUpload,
    UnmaskedSum,
    VectorLayout,
)
from medfed.contract.wire import EnvelopeHeader, EnvelopeLimits, decode_envelope
from medfed.errors import ConfigError, EnvelopeError, SecureAggregationError

__all__ = [
    "DEFAULT_MAX_WAIT_SECONDS",
    "AuditRecorder",
    "MaskingRounds",
    "RoundAbortedError",
    "StateNotSavedError",
    "UnknownRoundError",
    "WithdrawalRequest",
    "create_masking_router",
    "install_error_handlers",
]

logger = logging.getLogger(__name__)

StudyId = Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN.pattern)]
SiteId = Annotated[str, PathParam(pattern=IDENTIFIER_PATTERN.pattern)]
RoundNumber = Annotated[int, PathParam(ge=0, le=1_000_000)]
WaitSeconds = Annotated[
    float | None,
    Query(
        ge=0,
        allow_inf_nan=False,
        description="seconds to hold the request while the round is not ready; "
        "capped by the service",
    ),
]
_PREFIX = "/v1/studies/{study}/rounds/{round_number}/secagg"
# Magic, format version and header length in front of an envelope's header.
_ENVELOPE_PREFIX_BYTES = 9
#: Default cap on ``wait``, in seconds. It stays below the 60 s that reverse
#: proxies such as nginx (``proxy_read_timeout``) allow a response by default.
#: NOTE: uvicorn waits for held requests at shutdown, so stopping the service
#: can take this long.
DEFAULT_MAX_WAIT_SECONDS = 30.0
# A request held until its phase's deadline wakes this much later, so that
# ``close_overdue_phase``, which reads the wall clock, finds the deadline passed.
_DEADLINE_GRACE_SECONDS = 0.01
# Aborted rounds whose reason a late request still receives; older ones get 404.
_MAX_ABORTED_ROUNDS_KEPT = 1000

_T = TypeVar("_T")

AuditRecorder = Callable[[str, str, dict[str, Any]], None]
"""Called as ``record(event, actor, details)`` to append to the service's audit log."""


class WithdrawalRequest(BaseModel):
    """The optional JSON body of ``POST /withdrawals/{site}``."""

    model_config = ConfigDict(extra="forbid")

    #: Who sends the withdrawal: the site itself (the default) or the
    #: coordinator. With a client certificate it must match the certificate's
    #: role. Without one (local mode) the service takes it as stated.
    requested_by: Literal["site", "coordinator"] = "site"


class UnknownRoundError(SecureAggregationError):
    """No masking round is open for this study and round."""


class RoundAbortedError(SecureAggregationError):
    """The masking round was aborted; it takes no further messages."""


class StateNotSavedError(SecureAggregationError):
    """The store failed to save a change, so the change was not accepted."""


class _Listener:
    """Wakes one held request from whichever thread changes the round's phase."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()
        #: The deadline (Unix time) of the round's phase when the listener
        #: was added.
        self.deadline_at: float | None = None

    def wake(self) -> None:
        # A closed loop raises RuntimeError, and its held request is gone.
        with suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self, timeout: float) -> bool:
        """Wait until woken or ``timeout`` seconds pass; return True if woken."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass
class _OpenRound:
    server: RecordingMaskingServer
    sites: tuple[str, ...]
    layout: VectorLayout
    lock: threading.Lock
    #: Unix time after which a site's poll closes the current phase with the
    #: sites that have sent their message, or None to close phases only
    #: explicitly.
    deadline_at: float | None = None
    #: Unix time after which a poll closes advertising; None leaves it to
    #: ``deadline_at``.
    advertising_deadline_at: float | None = None
    #: Seconds after advertising closed at which a poll closes sharing; None
    #: leaves it to ``deadline_at``.
    sharing_seconds: float | None = None
    #: Held requests to wake when the phase changes or the round is aborted.
    listeners: set[_Listener] = dataclasses.field(default_factory=set)
    #: Why the round was aborted, once it was.
    abort_reason: str | None = None
    #: The envelope of a masked upload accepted in the current request, and
    #: its table; saved with the request's changes.
    pending_upload: tuple[StoredUpload, MaskedUploadTable] | None = None

    def attach_upload(
        self, upload: StoredUpload, table: MaskedUploadTable = "uploads"
    ) -> None:
        """Save ``upload``, the envelope of the masked update just accepted, too."""
        self.pending_upload = (upload, table)
        self.server.envelope_sha256[upload.site] = upload.sha256

    def wake_listeners(self) -> None:
        for listener in self.listeners:
            listener.wake()
        self.listeners.clear()

    def upload_candidates(self) -> list[str]:
        """Return the sites that uploaded or may still upload, sorted.

        While advertising, these are the round's sites that did not withdraw.
        Later, they are ``MaskingServer.upload_candidates``.
        """
        if self.server.phase_name == "advertising":
            return sorted(set(self.sites) - set(self.server.withdrawn_sites))
        return self.server.upload_candidates

    def close_complete_phase(self) -> None:
        """Close the current phase once no site is left to wait for.

        A phase waits for every site that did not withdraw: the round's
        sites to advertise, the roster to share, those that shared to upload.
        """
        server = self.server
        phase = server.phase_name
        if phase == "advertising":
            answered = set(server.advertised_sites) | set(server.withdrawn_sites)
            if answered >= set(self.sites):
                server.close_advertising()
        elif phase == "sharing" and server.sharing_complete:
            server.close_sharing()
        elif phase == "uploading" and server.uploads_complete:
            server.close_uploads()

    def phase_deadline(self) -> float | None:
        """Return the Unix time at which the current phase becomes overdue.

        Advertising and sharing end at their own deadlines, when the round
        has them, and never later than the round's deadline. Uploads end at
        the round's deadline, because a site that trains slowly cannot be
        distinguished from one that hangs.
        """
        server = self.server
        own = None
        if server.phase_name == "advertising":
            own = self.advertising_deadline_at
        elif (
            server.phase_name == "sharing"
            and self.sharing_seconds is not None
            and server.advertising_closed_at is not None
        ):
            own = server.advertising_closed_at + self.sharing_seconds
        deadlines = [d for d in (own, self.deadline_at) if d is not None]
        return min(deadlines, default=None)

    def close_overdue_phase(self) -> None:
        """Close the current phase if its deadline passed, so polls can go on.

        The sites that have not sent their message by then are left out of
        the round, and a warning names them.

        Raises:
            SecureAggregationError: too few sites sent their message for the
                phase to close; the round can then only be aborted.
        """
        deadline = self.phase_deadline()
        if deadline is None or time.time() < deadline:
            return
        server = self.server
        phase = server.phase_name
        withdrawn = set(server.withdrawn_sites)
        if phase == "advertising":
            missing = set(self.sites) - set(server.advertised_sites) - withdrawn
            server.close_advertising()
        elif phase == "sharing":
            missing = set(server.roster.sites) - set(server.sharing_sites) - withdrawn
            server.close_sharing()
        elif phase == "uploading":
            missing = set(server.sharing_sites) - set(server.uploaded_sites)
            missing -= withdrawn
            server.close_uploads()
        else:
            return
        if missing:
            logger.warning(
                "masking round %s of study %s closed %s at its deadline without "
                "sites %s, which are left out of the round",
                server.context.round_number, server.context.study, phase,
                ", ".join(sorted(missing)),
            )  # fmt: skip


class MaskingRounds:
    """The masking rounds a service process runs.

    With a ``store``, each round's setup and every change it acknowledges
    are saved before the request that made the change gets its response
    (``masking_state``), and ``restore_saved`` resumes the saved rounds after
    a restart. Without one, rounds live in this process only.

    With ``verify_keys`` (each site's Ed25519 public key from the site
    registry, in deployment mode), every round, opened or restored, rejects
    a key advertisement that is unsigned, does not verify against its site's
    key, or comes from a site without one. So one site with a wrong key
    cannot put an advertisement in the roster that every other site would
    reject. Without them (local mode), advertisements are not checked.

    NOTE: held requests and the time a site waited are not saved. After a
    restart each site sends its request again (``MaskingClient`` retries
    connection errors), and the round keeps its original deadlines.
    """

    def __init__(
        self,
        limits: EnvelopeLimits | None = None,
        *,
        max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS,
        store: MaskingRoundStore | None = None,
        verify_keys: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        if not 0 <= max_wait_seconds < float("inf"):
            raise ConfigError(
                "max_wait_seconds must be a finite number of seconds >= 0, got "
                f"{max_wait_seconds!r}"
            )
        self.limits = limits or EnvelopeLimits()
        #: Max time in seconds that a GET route keeps a request for a later phase waiting.
        self.max_wait_seconds = max_wait_seconds
        self._rounds: dict[tuple[str, int], _OpenRound] = {}
        self._aborted: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._lock = threading.Lock()
        self._store = store
        self._verify_keys = verify_keys

    def open(
        self,
        study: str,
        round_number: int,
        *,
        sites: Sequence[str],
        threshold: int,
        encoding: RingEncoding,
        layout: VectorLayout,
        deadline_at: float | None = None,
        opened_at: float | None = None,
        key_exchange_seconds: float | None = None,
    ) -> None:
        """Start a masking round for ``sites`` over updates of ``layout``.

        After ``deadline_at`` (Unix time), a site polling for the next phase
        closes the current one with the sites that have sent their message.
        With ``opened_at`` (Unix time) and ``key_exchange_seconds``, the
        key exchange closes that way earlier: advertising
        ``key_exchange_seconds`` after ``opened_at``, and sharing
        ``key_exchange_seconds`` after advertising closed.

        Raises:
            SecureAggregationError: the round is already open.
        """
        for site in sites:
            validate_identifier(site, kind="site")
        setup = RoundSetup(
            study=study,
            round_number=round_number,
            sites=tuple(sorted(sites)),
            threshold=threshold,
            encoding=encoding,
            layout=layout,
            deadline_at=deadline_at,
            opened_at=opened_at,
            key_exchange_seconds=key_exchange_seconds,
        )
        server = new_server(setup, self._verify_keys)
        with self._lock:
            if (study, round_number) in self._rounds:
                raise SecureAggregationError(
                    f"masking round {round_number} of study {study!r} is already open"
                )
            if self._store is not None:
                self._store.open_masking_round(study, round_number, setup.to_json())
            self._add_round(setup, server)
        logger.info(
            "opened masking round %s of study %s for %s sites",
            round_number,
            study,
            len(sites),
        )

    def _add_round(self, setup: RoundSetup, server: RecordingMaskingServer) -> None:
        """Add an opened or restored round. The caller must have acquired ``self._lock``."""
        key = (setup.study, setup.round_number)
        self._rounds[key] = _OpenRound(
            server,
            setup.sites,
            setup.layout,
            threading.Lock(),
            setup.deadline_at,
            setup.advertising_deadline_at,
            setup.key_exchange_seconds,
        )
        self._aborted.pop(key, None)

    def restore_saved(self) -> int:
        """Load the rounds the store keeps; return how many resumed.

        A round whose service round is still open (or that has no service
        round) resumes in the phase it reached, with every change it
        acknowledged. An aborted round keeps its reason for late requests.
        A round that cannot be rebuilt is aborted, and the error is logged.
        """
        if self._store is None:
            return 0
        resumed = 0
        for study, round_number in self._store.masking_round_keys():
            summary = self._store.masking_round(
                study, round_number, with_messages=False
            )
            if summary is None or summary.service_state == "finalized":
                continue
            if summary.state == "aborted":
                self._keep_abort_reason(study, round_number, summary.reason or "")
                continue
            if summary.service_state == "aborted":
                self._keep_abort_reason(
                    study,
                    round_number,
                    f"the service aborted round {round_number} of study {study!r}",
                )
                continue
            if summary.state == "unmasked" and summary.service_state is None:
                continue
            saved = self._store.masking_round(study, round_number)
            assert saved is not None
            try:
                setup, server = replay(saved, self.limits, self._verify_keys)
            except SecureAggregationError as error:
                reason = f"its saved state could not be restored: {error}"
                logger.error(
                    "aborted masking round %s of study %s: %s",
                    round_number,
                    study,
                    reason,
                )
                self._store.close_masking_round(
                    study, round_number, state="aborted", reason=reason
                )
                self._keep_abort_reason(study, round_number, reason)
                continue
            with self._lock:
                self._add_round(setup, server)
            resumed += 1
            logger.info(
                "restored masking round %s of study %s in phase %s after %s "
                "saved changes",
                round_number,
                study,
                server.phase_name,
                server.saved_count,
            )
        return resumed

    def _keep_abort_reason(self, study: str, round_number: int, reason: str) -> None:
        with self._lock:
            self._keep_abort_reason_locked(study, round_number, reason)

    def _keep_abort_reason_locked(
        self, study: str, round_number: int, reason: str
    ) -> None:
        """Store an abort reason. The caller must have acquired ``self._lock``."""
        self._aborted[(study, round_number)] = reason
        while len(self._aborted) > _MAX_ABORTED_ROUNDS_KEPT:
            self._aborted.popitem(last=False)

    def _save(self, study: str, round_number: int, entry: _OpenRound) -> None:
        """Save the changes of the current request; the caller holds the round's lock.

        Raises:
            StateNotSavedError: the store failed. The round then goes back to
                its last saved state, so it matches what the store has.
        """
        server = entry.server
        attached = entry.pending_upload
        entry.pending_upload = None
        if not server.pending:
            return
        if self._store is None:
            server.mark_saved()
            return
        upload: StoredUpload | None = None
        table: MaskedUploadTable = "uploads"
        if attached is not None:
            upload, table = attached
        try:
            self._store.append_masking_messages(
                study, round_number, server.saved_count, server.pending, upload, table
            )
        except sqlite3.Error as error:
            logger.error(
                "failed to save masking round %s of study %s: %s; restoring its "
                "last saved state",
                round_number,
                study,
                error,
            )
            self._reload(study, round_number, entry)
            raise StateNotSavedError(
                f"the aggregation service could not save masking round "
                f"{round_number} of study {study!r}, so the message was not "
                "accepted; send it again"
            ) from error
        server.mark_saved()

    def _reload(self, study: str, round_number: int, entry: _OpenRound) -> None:
        """Rebuild ``entry`` from the store, or abort it if that fails too."""
        assert self._store is not None
        try:
            saved = self._store.masking_round(study, round_number)
            if saved is None:
                raise SecureAggregationError("the store has no such round")
            _, entry.server = replay(saved, self.limits, self._verify_keys)
        except (SecureAggregationError, sqlite3.Error) as error:
            reason = f"its state could not be saved or restored: {error}"
            logger.error(
                "aborted masking round %s of study %s: %s", round_number, study, reason
            )
            entry.abort_reason = reason
            with self._lock:
                self._rounds.pop((study, round_number), None)
            self._keep_abort_reason(study, round_number, reason)
            entry.wake_listeners()

    @contextmanager
    def edit(self, study: str, round_number: int) -> Iterator[_OpenRound]:
        """Hold a round's lock while a request reads or changes it.

        The changes the block made are saved when it ends, even if it
        raises. Held requests wake when the round leaves its phase inside
        the block.

        Raises:
            UnknownRoundError: no such round is open.
            RoundAbortedError: the round was aborted.
            StateNotSavedError: the store failed to save the block's changes.
        """
        with self._lock:
            entry = self._rounds.get((study, round_number))
            aborted = self._aborted.get((study, round_number))
        if entry is None:
            if aborted is not None:
                raise _aborted_error(study, round_number, aborted)
            raise UnknownRoundError(
                f"no masking round {round_number} is open for study {study!r}"
            )
        with entry.lock:
            if entry.abort_reason is not None:
                raise _aborted_error(study, round_number, entry.abort_reason)
            phase = entry.server.phase_name
            try:
                yield entry
            finally:
                try:
                    self._save(study, round_number, entry)
                finally:
                    if entry.server.phase_name != phase:
                        entry.wake_listeners()

    def abort(self, study: str, round_number: int, reason: str) -> bool:
        """Abort an open round: wake its held requests and forget its state.

        Later requests for the round get ``RoundAbortedError`` with ``reason``.
        Returns False, and changes nothing, when no such round is open.
        """
        with self._lock:
            if (study, round_number) not in self._rounds:
                return False
            if self._store is not None:
                self._store.close_masking_round(
                    study, round_number, state="aborted", reason=reason
                )
            entry = self._rounds.pop((study, round_number))
            # Under the same lock, so that no request finds the round
            # neither open nor aborted, which would get 404.
            self._keep_abort_reason_locked(study, round_number, reason)
        with entry.lock:
            entry.abort_reason = reason
            entry.wake_listeners()
        logger.info(
            "aborted masking round %s of study %s: %s", round_number, study, reason
        )
        return True

    async def read_when_ready(
        self,
        study: str,
        round_number: int,
        read: Callable[[_OpenRound], _T],
        wait: float,
    ) -> _T:
        """Return ``read(round)`` once its phase has come, waiting up to ``wait`` s.

        ``read`` raises ``RoundNotReadyError`` while the round is in an
        earlier phase. The wait is capped at ``max_wait_seconds``. At the
        deadline of the round's phase the request reads again, which closes
        the overdue phase (or aborts the round if too few sites sent their
        message), and waits on if its phase has still not come. Each read
        runs in the threadpool. Between reads the request only awaits an
        event, so it blocks neither the event loop nor a thread.

        Raises:
            RoundNotReadyError: the phase did not come within the wait.
            UnknownRoundError: no such round is open.
            RoundAbortedError: the round was aborted, possibly while waiting.
        """
        loop = asyncio.get_running_loop()
        hold_until = loop.time() + min(wait, self.max_wait_seconds)
        stale: _Listener | None = None
        while True:
            if loop.time() >= hold_until:
                return await run_in_threadpool(
                    self._read_or_listen, study, round_number, read, None, stale
                )
            listener = _Listener(loop)
            try:
                return await run_in_threadpool(
                    self._read_or_listen, study, round_number, read, listener, stale
                )
            except RoundNotReadyError:
                pass
            timeout = hold_until - loop.time()
            if listener.deadline_at is not None:
                until_deadline = listener.deadline_at - time.time()
                if until_deadline > 0:
                    timeout = min(timeout, until_deadline + _DEADLINE_GRACE_SECONDS)
            # After the wait, whether woken or not, the next read returns the
            # result, closes the phase that became overdue, or ends the hold.
            await listener.wait(timeout)
            stale = listener

    def _read_or_listen(
        self,
        study: str,
        round_number: int,
        read: Callable[[_OpenRound], _T],
        listener: _Listener | None,
        stale: _Listener | None,
    ) -> _T:
        """Read the round; if it is not ready, add ``listener`` under the same lock.

        Adding the listener under the lock that phase changes take means no
        change between the read and the wait goes unnoticed. ``stale`` is
        the caller's previous listener, removed in case it timed out.
        """
        with self.edit(study, round_number) as entry:
            if stale is not None:
                entry.listeners.discard(stale)
            phase = entry.server.phase_name
            try:
                entry.close_overdue_phase()
            except SecureAggregationError as error:
                failure = error
            else:
                try:
                    return read(entry)
                except RoundNotReadyError:
                    if listener is not None:
                        listener.deadline_at = entry.phase_deadline()
                        entry.listeners.add(listener)
                    raise
        # The phase is overdue and too few sites sent their message, so
        # waiting longer cannot save the round. ``abort`` takes the round's
        # lock, which ``edit`` held until here.
        reason = f"{phase} reached its deadline and could not close: {failure}"
        if not self.abort(study, round_number, reason):
            # Another request aborted the round first.
            reason = self.abort_reason(study, round_number) or reason
        raise _aborted_error(study, round_number, reason)

    def progress(self, study: str, round_number: int) -> dict[str, Any] | None:
        """Describe how far a round got, by site ids only; None if it is unknown.

        The description has the ``phase`` (``advertising``, ``sharing``,
        ``uploading``, ``revealing``, or ``aborted`` with its ``reason``) and
        the sites that ``advertised`` keys, ``shared`` them, ``uploaded``
        masked updates, ``revealed`` shares and ``withdrew``. It contains no
        key, share or update, and it closes no phase. A round that was
        unmasked is forgotten, so it is unknown.
        """
        with self._lock:
            entry = self._rounds.get((study, round_number))
            aborted = self._aborted.get((study, round_number))
        if entry is None:
            if aborted is None:
                return None
            return {"phase": "aborted", "reason": aborted}
        with entry.lock:
            if entry.abort_reason is not None:
                return {"phase": "aborted", "reason": entry.abort_reason}
            server = entry.server
            return {
                "phase": server.phase_name,
                "reason": None,
                "advertised": server.advertised_sites,
                "shared": server.sharing_sites,
                "uploaded": server.uploaded_sites,
                "revealed": server.revealed_sites,
                "withdrew": server.withdrawn_sites,
            }

    def abort_reason(self, study: str, round_number: int) -> str | None:
        """Return why the round was aborted, or None if it was not (or is forgotten)."""
        with self._lock:
            return self._aborted.get((study, round_number))

    def unmask(self, study: str, round_number: int) -> UnmaskedSum:
        """Unmask the round's sum and forget the round.

        Raises:
            SecureAggregationError: the round cannot be unmasked; it stays
                open so that late reveals can still arrive.
        """
        with self.edit(study, round_number) as entry:
            result = entry.server.unmask()
        if self._store is not None:
            self._store.close_masking_round(study, round_number, state="unmasked")
        with self._lock:
            self._rounds.pop((study, round_number), None)
        return result


def _aborted_error(study: str, round_number: int, reason: str) -> RoundAbortedError:
    return RoundAbortedError(
        f"masking round {round_number} of study {study!r} was aborted: {reason}"
    )


def _advertisement_rejection(
    error: AdvertisementSignatureError, site: str
) -> AdvertisementSignatureError:
    """Return ``error`` with what the operator of ``site`` should check."""
    return AdvertisementSignatureError(
        f"{error}. Check the startup kit of site {site!r}: its "
        f"{KitFiles.SIGNING_KEY} must be the key that the aggregation service's "
        f"{KitFiles.SITE_REGISTRY} lists for the site, so both kits must come "
        "from the same medfed provision run"
    )


def _require_site(request: Request, claimed: str) -> None:
    """Reject a request whose client certificate names another site.

    A site may advertise keys, upload shares and masked updates, fetch its
    relayed shares and reveal shares only as itself. Without a client
    certificate (local mode) the router's own dependency has already decided
    whether anonymous callers are allowed.
    """
    identity = peer_identity(request.scope)
    if identity is None:
        return
    if identity.role != "site" or identity.name != claimed:
        logger.warning(
            "rejected %s %s: %s %s acted as site %s",
            request.method, request.url.path, identity.role, identity.name, claimed,
        )  # fmt: skip
        raise HTTPException(
            403, f"{identity.role} {identity.name!r} may not act as site {claimed!r}"
        )


def _withdrawal_actor(
    request: Request, site: str, requested_by: Literal["site", "coordinator"]
) -> str:
    """Return who withdraws ``site``: the site's id or "coordinator".

    A site may withdraw only itself. The coordinator may withdraw any site,
    because a site whose process died cannot send its own withdrawal.

    Raises:
        HTTPException: 403 when the client certificate names another site,
            or a role other than ``requested_by``.
    """
    identity = peer_identity(request.scope)
    if identity is None:
        return "coordinator" if requested_by == "coordinator" else site
    if identity.role != requested_by:
        logger.warning(
            "rejected %s %s: %s %s sent a withdrawal requested_by %s",
            request.method, request.url.path, identity.role, identity.name, requested_by,
        )  # fmt: skip
        raise HTTPException(
            403,
            f"{identity.role} {identity.name!r} sent a withdrawal with requested_by "
            f"{requested_by!r}; set requested_by to {identity.role!r}",
        )
    if identity.role == "site" and identity.name != site:
        logger.warning(
            "rejected %s %s: site %s tried to withdraw site %s",
            request.method, request.url.path, identity.name, site,
        )  # fmt: skip
        raise HTTPException(
            403,
            f"site {identity.name!r} may not withdraw site {site!r}; only that site "
            "or the coordinator may",
        )
    return identity.name


def _require_coordinator(request: Request) -> None:
    """Reject a phase-closing request from anyone but the coordinator."""
    identity = peer_identity(request.scope)
    if identity is not None and identity.role != "coordinator":
        logger.warning(
            "rejected %s %s from %s %s: only the coordinator closes phases",
            request.method, request.url.path, identity.role, identity.name,
        )  # fmt: skip
        raise HTTPException(403, "only the coordinator may close a masking phase")


#: Takes a site's masked envelope (study, round, site, body) as a service's own
#: upload route does and returns the response body.
MaskedUploadHandler = Callable[[str, int, str, bytes], Awaitable[dict[str, Any]]]


def create_masking_router(
    rounds: MaskingRounds,
    *,
    masked_upload: MaskedUploadHandler | None = None,
    record: AuditRecorder | None = None,
) -> APIRouter:
    """Return the routes of masking rounds kept in ``rounds``.

    With ``masked_upload``, ``PUT /masked/{site}`` hands each envelope to it,
    so that a service checks its signature, stores it, counts it towards the
    quorum and audits it exactly as on its own upload route. ``record``
    appends the withdrawals, the withdrawals the round rejects, and the key
    advertisements rejected for their signature to the service's audit log.
    """
    router = APIRouter(prefix=_PREFIX)

    @router.post("/keys")
    def advertise(
        study: StudyId,
        round_number: RoundNumber,
        advertisement: KeyAdvertisement,
        request: Request,
    ) -> dict[str, Any]:
        site = advertisement.site
        _require_site(request, site)
        try:
            with rounds.edit(study, round_number) as entry:
                if site not in entry.sites:
                    raise SecureAggregationError(
                        f"site {site!r} does not take part in round {round_number}"
                    )
                entry.server.add_advertisement(advertisement)
                entry.close_complete_phase()
        except AdvertisementSignatureError as error:
            rejection = _advertisement_rejection(error, site)
            if record is not None:
                details = {
                    "study": study,
                    "round": round_number,
                    "status": _status_of(rejection),
                    "reason": str(rejection),
                }
                record("advertisement.rejected", site, details)
            raise rejection from None
        return {"site": site}

    @router.post("/keys/close")
    def close_advertising(
        study: StudyId, round_number: RoundNumber, request: Request
    ) -> KeyRoster:
        _require_coordinator(request)
        with rounds.edit(study, round_number) as entry:
            return entry.server.close_advertising()

    @router.get("/roster")
    async def roster(
        study: StudyId, round_number: RoundNumber, wait: WaitSeconds = None
    ) -> KeyRoster:
        return await rounds.read_when_ready(
            study, round_number, lambda entry: entry.server.roster, wait or 0.0
        )

    @router.post("/shares")
    def upload_shares(
        study: StudyId, round_number: RoundNumber, upload: ShareUpload, request: Request
    ) -> dict[str, Any]:
        _require_site(request, upload.sender)
        with rounds.edit(study, round_number) as entry:
            entry.server.add_share_upload(upload)
            entry.close_complete_phase()
        return {"site": upload.sender}

    @router.post("/shares/close")
    def close_sharing(
        study: StudyId, round_number: RoundNumber, request: Request
    ) -> dict[str, Any]:
        _require_coordinator(request)
        with rounds.edit(study, round_number) as entry:
            entry.server.close_sharing()
            return {"sites": entry.server.sharing_sites}

    @router.get("/shares/{site}")
    async def relayed_shares(
        study: StudyId,
        round_number: RoundNumber,
        site: SiteId,
        request: Request,
        wait: WaitSeconds = None,
    ) -> list[EncryptedShare]:
        _require_site(request, site)
        return await rounds.read_when_ready(
            study,
            round_number,
            lambda entry: entry.server.shares_for(site),
            wait or 0.0,
        )

    @router.put("/masked/{site}")
    async def upload_masked(
        study: StudyId, round_number: RoundNumber, site: SiteId, request: Request
    ) -> dict[str, Any]:
        _require_site(request, site)
        limit = (
            _ENVELOPE_PREFIX_BYTES
            + rounds.limits.max_header_bytes
            + rounds.limits.max_payload_bytes
        )
        body = await _read_limited_body(request, limit)
        if masked_upload is not None:
            return await masked_upload(study, round_number, site, body)
        # Decoding and the round's lock stay off the event loop, where
        # requests held by ``read_when_ready`` wait.
        await run_in_threadpool(
            _add_masked_envelope, rounds, body, study, round_number, site
        )
        return {"site": site}

    @router.post("/withdrawals/{site}")
    def withdraw(
        study: StudyId,
        round_number: RoundNumber,
        site: SiteId,
        request: Request,
        body: WithdrawalRequest | None = None,
    ) -> dict[str, Any]:
        body = body or WithdrawalRequest()
        actor = _withdrawal_actor(request, site, body.requested_by)
        where = {"study": study, "round": round_number, "site": site}
        try:
            with rounds.edit(study, round_number) as entry:
                server = entry.server
                phase = server.phase_name
                if site not in entry.sites:
                    raise SecureAggregationError(
                        f"site {site!r} is not one of the sites of masking round "
                        f"{round_number}, so it cannot be withdrawn from it"
                    )
                already_withdrawn = site in server.withdrawn_sites
                server.withdraw(site)
                remaining = len(entry.upload_candidates())
                # A roster also needs MIN_SITES sites, which exceeds the
                # threshold of 2 that a 3-site round has.
                needed = server.threshold
                if phase == "advertising":
                    needed = max(needed, MIN_SITES)
                reachable = remaining >= needed
                requirement = (
                    f"the threshold {server.threshold}"
                    if needed == server.threshold
                    else f"the {MIN_SITES} sites a roster needs"
                )
                if reachable:
                    entry.close_complete_phase()
        except SecureAggregationError as error:
            if record is not None:
                details = {**where, "status": _status_of(error), "reason": str(error)}
                record("site.withdrawal_rejected", actor, details)
            raise
        if already_withdrawn:
            logger.info(
                "site %s had already withdrawn from masking round %s of study %s; "
                "the withdrawal by %s changed nothing",
                site, round_number, study, actor,
            )  # fmt: skip
            return {"site": site, "already_withdrawn": True}
        logger.info(
            "site %s withdrawn from masking round %s of study %s in phase %s by %s",
            site, round_number, study, phase, actor,
        )  # fmt: skip
        if record is not None:
            record("site.withdrawn", actor, {**where, "phase": phase})
        if not reachable:
            # Waiting for the deadline could not save the round, so the sites
            # held on its routes get the reason now.
            rounds.abort(
                study,
                round_number,
                f"after site {site!r} withdrew, at most {remaining} sites can "
                f"upload, fewer than {requirement}; nothing is unmasked",
            )
        return {"site": site, "already_withdrawn": False}

    @router.post("/uploads/close")
    def close_uploads(
        study: StudyId, round_number: RoundNumber, request: Request
    ) -> RevealRequest:
        _require_coordinator(request)
        with rounds.edit(study, round_number) as entry:
            return entry.server.close_uploads()

    @router.get("/reveal-request")
    async def reveal_request(
        study: StudyId, round_number: RoundNumber, wait: WaitSeconds = None
    ) -> RevealRequest:
        return await rounds.read_when_ready(
            study,
            round_number,
            lambda entry: entry.server.reveal_request,
            wait or 0.0,
        )

    @router.post("/reveals")
    def reveal(
        study: StudyId,
        round_number: RoundNumber,
        revealed: RevealedShares,
        request: Request,
    ) -> dict[str, Any]:
        _require_site(request, revealed.site)
        with rounds.edit(study, round_number) as entry:
            entry.server.add_reveal(revealed)
        return {"site": revealed.site}

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Map secure-aggregation errors to 404, 409, 425 and 503 JSON responses."""

    @app.exception_handler(SecureAggregationError)
    async def _rejected(
        request: Request, error: SecureAggregationError
    ) -> JSONResponse:
        logger.info("rejected %s %s: %s", request.method, request.url.path, error)
        return JSONResponse(
            status_code=_status_of(error), content={"detail": str(error)}
        )


def _status_of(error: SecureAggregationError) -> int:
    """Return the HTTP status of a rejected masking request: 404, 425, 503 or 409."""
    if isinstance(error, UnknownRoundError):
        return 404
    if isinstance(error, RoundNotReadyError):
        return 425
    if isinstance(error, StateNotSavedError):
        return 503
    return 409


async def _read_limited_body(request: Request, limit: int) -> bytes:
    """Read the body, rejecting it as soon as it exceeds ``limit`` bytes."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise SecureAggregationError(
                f"request body exceeds the limit of {limit} bytes for an envelope"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _add_masked_envelope(
    rounds: MaskingRounds, body: bytes, study: str, round_number: int, site: str
) -> None:
    sha256 = hashlib.sha256(body).hexdigest()
    with rounds.edit(study, round_number) as entry:
        if entry.server.envelope_sha256.get(site) == sha256:
            return  # a retry of an accepted upload
        vector, header = _read_masked_envelope(
            body, entry, study, round_number, site, rounds.limits
        )
        entry.server.add_masked_update(site, vector, sample_count=header.sample_count)
        upload = StoredUpload(
            site=site,
            sha256=sha256,
            nonce=header.nonce,
            sample_count=header.sample_count,
            size=len(body),
            envelope=body,
            received_at=time.time(),
        )
        entry.attach_upload(upload, "masked_uploads")
        if entry.server.uploads_complete:
            entry.server.close_uploads()


def _read_masked_envelope(
    body: bytes,
    entry: _OpenRound,
    study: str,
    round_number: int,
    site: str,
    limits: EnvelopeLimits,
) -> tuple[Any, EnvelopeHeader]:
    try:
        decoded = decode_envelope(body, limits)
    except (EnvelopeError, ConfigError) as error:
        raise SecureAggregationError(f"invalid update envelope: {error}") from None
    header = decoded.header
    for field, expected, actual in (
        ("study", study, header.study),
        ("round", round_number, header.round),
        ("site", site, header.site),
    ):
        if expected != actual:
            raise SecureAggregationError(
                f"envelope {field} is {actual!r} but the request is for {expected!r}"
            )
    expected_codec = entry.server.encoding.codec_params
    if header.codec.name != "masked" or header.codec.params != expected_codec:
        raise SecureAggregationError(
            f"envelope codec is {header.codec.name!r} with {header.codec.params}; "
            f"this round expects 'masked' with {expected_codec}"
        )
    return entry.layout.join(decoded.tensors), header
