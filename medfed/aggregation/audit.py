"""An append-only, hash-chained audit log of what the aggregation service did.

Each entry is one line of canonical JSON (sorted keys, no spaces, ASCII) with
the fields ``seq`` (1, 2, ... equal to the line number), ``time`` (UTC, ISO
8601), ``event``, ``actor``, ``details``, ``prev_hash`` and ``hash``. ``hash``
is the SHA-256 of the canonical JSON of the other six fields, and
``prev_hash`` is the previous entry's ``hash`` (64 zeros for the first).
Editing, deleting, inserting or reordering an entry therefore breaks the
chain at that entry. An edit or insertion whose own hash was recomputed
breaks it at the entry after it. Every append is fsynced before ``append``
returns.

A chain alone cannot show that entries were cut off its end, or that an
attacker rewrote every entry after the one changed. For that the service
signs the head with its Ed25519 key (``sign_head``); ``verify`` with that
signed head then fails when the log no longer contains the signed entry.

Details record ids, counts, reasons and hashes. They never contain a key,
secret or patient value: ``append`` rejects detail names that suggest a
secret, and accepts only scalar values and short lists of scalars.
"""

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.errors import AuditLogError

__all__ = [
    "AUDIT_EVENTS",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditLog",
    "VerifyResult",
    "entry_hash",
    "verify",
]

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
AUDIT_EVENTS = frozenset(
    {
        "advertisement.rejected",
        "aggregate.decrypted",
        "aggregate.decryption_rejected",
        "aggregate.downloaded",
        "audit.recovered",
        "authentication.rejected",
        "coordinator.authenticated",
        "model.downloaded",
        "model.registered",
        "privacy.refused",
        "privacy.spent",
        "round.aborted",
        "round.finalized",
        "round.opened",
        "service.started",
        "shares.revealed",
        "site.authenticated",
        "site.withdrawal_rejected",
        "site.withdrawn",
        "study.provisioned",
        "update.accepted",
        "update.rejected",
    }
)
_FIELDS = ("seq", "time", "event", "actor", "details", "prev_hash", "hash")
_DETAIL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# Detail names made of these words are rejected; "key_id" names a public
# fingerprint and is allowed.
_SECRET_WORDS = {"secret", "password", "passphrase", "token", "private", "seed", "key"}
_ALLOWED_SECRET_LIKE = {"key_id", "key_ids"}
_MAX_TEXT = 500
_MAX_LIST = 1000


class HeadSigner(Protocol):
    key_id: str

    def sign(self, data: bytes) -> str: ...


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: str
    event: str
    actor: str
    details: dict[str, Any]
    prev_hash: str
    hash: str

    def to_line(self) -> bytes:
        return _canonical({name: getattr(self, name) for name in _FIELDS}) + b"\n"


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify``.

    Attributes:
        ok: True when every entry and the signed head (if given) check out.
        entries: entries read before the first break, or all of them.
        head: the hash of the last valid entry (``GENESIS_HASH`` when none).
        broken_at: the 1-based entry number where verification failed, or
            None when ``ok``.
        reason: why it failed, or "" when ``ok``.
    """

    ok: bool
    entries: int
    head: str
    broken_at: int | None = None
    reason: str = ""


def entry_hash(
    *,
    seq: int,
    time: str,
    event: str,
    actor: str,
    details: Mapping[str, Any],
    prev_hash: str,
) -> str:
    """Return the SHA-256 (hex) of an entry's canonical JSON without ``hash``."""
    fields = {
        "seq": seq,
        "time": time,
        "event": event,
        "actor": actor,
        "details": dict(details),
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(_canonical(fields)).hexdigest()


class AuditLog:
    """An audit log file opened for appending by one process.

    Opening verifies the whole chain and takes an exclusive ``flock`` on the
    file, so a second service cannot interleave entries. A last line without
    its newline (a write cut short by a crash) is moved to a
    ``<name>.partial-<time>`` file and recorded in an ``audit.recovered``
    entry. Any other break raises ``AuditLogError``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise AuditLogError(
                f"audit log {self.path} is in use by another process; stop it "
                "before starting a second service on the same state directory"
            ) from None
        self._descriptor = descriptor
        recovered = self._cut_partial_tail()
        result = verify(self.path)
        if not result.ok:
            self.close()
            raise AuditLogError(
                f"audit log {self.path} is broken at entry {result.broken_at}: "
                f"{result.reason}. Keep the file as evidence and start the service "
                "with a new audit log"
            )
        self._seq = result.entries
        self._head = result.head
        if recovered is not None:
            self.append("audit.recovered", "aggregation", recovered)

    def close(self) -> None:
        with self._lock:
            if self._descriptor >= 0:
                os.close(self._descriptor)
                self._descriptor = -1

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def entries(self) -> int:
        return self._seq

    def head(self) -> str:
        """Return the hash of the last entry (``GENESIS_HASH`` for an empty log)."""
        return self._head

    def append(
        self, event: str, actor: str, details: Mapping[str, Any] | None = None
    ) -> AuditEntry:
        """Append one entry and fsync it; return the entry.

        Raises:
            AuditLogError: the event is unknown, a detail name suggests a
                secret, a detail value is not a short scalar or list of
                scalars, or the write failed.
        """
        if event not in AUDIT_EVENTS:
            raise AuditLogError(
                f"unknown audit event {event!r}: use one of {sorted(AUDIT_EVENTS)}"
            )
        clean = _check_details(details or {})
        actor = str(actor)[:200]
        with self._lock:
            if self._descriptor < 0:
                raise AuditLogError(f"audit log {self.path} is closed")
            seq = self._seq + 1
            time = datetime.now(UTC).isoformat(timespec="microseconds")
            digest = entry_hash(
                seq=seq,
                time=time,
                event=event,
                actor=actor,
                details=clean,
                prev_hash=self._head,
            )
            entry = AuditEntry(seq, time, event, actor, clean, self._head, digest)
            line = entry.to_line()
            try:
                written = os.write(self._descriptor, line)
                if written != len(line):
                    raise OSError(f"short write: {written} of {len(line)} bytes")
                os.fsync(self._descriptor)
            except OSError as error:
                raise AuditLogError(
                    f"failed to append to audit log {self.path}: {error}"
                ) from error
            self._seq = seq
            self._head = digest
        return entry

    def sign_head(self, signer: HeadSigner) -> dict[str, Any]:
        """Return the current head signed by ``signer`` (the service's key).

        The document contains ``seq``, ``head``, ``time``, ``key_id`` and a
        base64 Ed25519 ``signature`` over the canonical JSON of the first
        three. Store it outside the log; ``verify`` checks a log against it.
        """
        with self._lock:
            statement = {
                "seq": self._seq,
                "head": self._head,
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            }
        signature = signer.sign(_canonical(statement))
        return {**statement, "key_id": signer.key_id, "signature": signature}

    def _cut_partial_tail(self) -> dict[str, Any] | None:
        size = os.fstat(self._descriptor).st_size
        if size == 0:
            return None
        with self.path.open("rb") as stream:
            stream.seek(size - 1)
            if stream.read(1) == b"\n":
                return None
            stream.seek(0)
            data = stream.read()
        keep = data.rfind(b"\n") + 1
        tail = data[keep:]
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        evidence = self.path.with_name(f"{self.path.name}.partial-{stamp}")
        evidence.write_bytes(tail)
        os.truncate(self.path, keep)
        os.fsync(self._descriptor)
        logger.warning(
            "audit log %s ended with an incomplete entry of %d bytes; moved it to %s",
            self.path,
            len(tail),
            evidence,
        )
        return {
            "partial_bytes": len(tail),
            "partial_sha256": hashlib.sha256(tail).hexdigest(),
            "evidence_file": evidence.name,
        }


def verify(
    path: Path | str,
    *,
    signed_head: Mapping[str, Any] | None = None,
    public_key: Ed25519PublicKey | None = None,
) -> VerifyResult:
    """Check an audit log's hash chain, and optionally a signed head.

    Args:
        path: the audit log (JSON lines).
        signed_head: a document from ``AuditLog.sign_head``; requires
            ``public_key``.
        public_key: the service's Ed25519 audit public key.

    Returns:
        The first entry where the chain breaks, with the reason; or ok.

    Raises:
        AuditLogError: the file cannot be read, or ``signed_head`` is given
            without ``public_key``.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise AuditLogError(f"cannot read audit log {path}: {error}") from None
    lines = data.split(b"\n")
    complete = lines[:-1]
    hashes: list[str] = []
    previous = GENESIS_HASH
    for number, line in enumerate(complete, start=1):
        reason = _check_line(line, number, previous)
        if reason:
            return VerifyResult(False, number - 1, previous, number, reason)
        previous = json.loads(line)["hash"]
        hashes.append(previous)
    if lines[-1]:
        number = len(complete) + 1
        return VerifyResult(
            False, len(complete), previous, number, "entry is truncated (no newline)"
        )
    result = VerifyResult(True, len(complete), previous)
    if signed_head is None:
        return result
    if public_key is None:
        raise AuditLogError("checking a signed head requires the service's public key")
    return _check_signed_head(result, hashes, signed_head, public_key)


def _check_line(line: bytes, number: int, previous: str) -> str:
    try:
        entry = json.loads(line)
    except ValueError:
        return "entry is not valid JSON"
    if not isinstance(entry, dict) or sorted(entry) != sorted(_FIELDS):
        return f"entry must have exactly the fields {list(_FIELDS)}"
    if entry["seq"] != number:
        return (
            f"entry has seq {entry['seq']!r} but is line {number}: an entry was "
            "deleted, inserted or moved"
        )
    if entry["prev_hash"] != previous:
        return "prev_hash does not match the hash of the previous entry"
    try:
        expected = entry_hash(**{name: entry[name] for name in _FIELDS[:-1]})
    except (TypeError, ValueError):
        return "entry fields have invalid types"
    if entry["hash"] != expected:
        return "hash does not match the entry's contents: the entry was edited"
    if _canonical(entry) != line:
        return "entry is not in canonical JSON form: the entry was edited"
    return ""


def _check_signed_head(
    result: VerifyResult,
    hashes: list[str],
    signed_head: Mapping[str, Any],
    public_key: Ed25519PublicKey,
) -> VerifyResult:
    try:
        statement = {name: signed_head[name] for name in ("seq", "head", "time")}
        signature = base64.b64decode(signed_head["signature"], validate=True)
        public_key.verify(signature, _canonical(statement))
    except (KeyError, TypeError, binascii.Error, InvalidSignature):
        return VerifyResult(
            False, result.entries, result.head, None, "signed head does not verify"
        )
    seq = statement["seq"]
    if not isinstance(seq, int) or seq < 0:
        return VerifyResult(
            False,
            result.entries,
            result.head,
            None,
            f"signed head seq {seq!r} is invalid",
        )
    if seq > len(hashes):
        return VerifyResult(
            False,
            result.entries,
            result.head,
            len(hashes) + 1,
            f"log ends at entry {len(hashes)} but the signed head is at entry {seq}: "
            "entries were removed from the end",
        )
    expected = hashes[seq - 1] if seq else GENESIS_HASH
    if expected != statement["head"]:
        return VerifyResult(
            False,
            result.entries,
            result.head,
            seq,
            f"entry {seq} does not match the signed head: the log was rewritten",
        )
    return result


def _check_details(details: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for name, value in details.items():
        if not isinstance(name, str) or not _DETAIL_NAME.fullmatch(name):
            raise AuditLogError(
                f"invalid audit detail name {name!r}: use lower-case letters, "
                "digits and '_'"
            )
        if name not in _ALLOWED_SECRET_LIKE and _SECRET_WORDS & set(name.split("_")):
            raise AuditLogError(
                f"audit detail {name!r} looks like a secret; audit entries record "
                "ids, counts, reasons and hashes only"
            )
        if isinstance(value, list | tuple):
            if len(value) > _MAX_LIST:
                raise AuditLogError(
                    f"audit detail {name!r} has {len(value)} items, more than "
                    f"{_MAX_LIST}"
                )
            clean[name] = [_check_scalar(name, item) for item in value]
        else:
            clean[name] = _check_scalar(name, value)
    return clean


def _check_scalar(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditLogError(f"audit detail {name!r} is not finite: {value!r}")
        return value
    if isinstance(value, str):
        if "-----BEGIN" in value:
            raise AuditLogError(f"audit detail {name!r} contains PEM key material")
        # Values come from clients too (reasons, paths), so long ones are cut.
        return value[:_MAX_TEXT]
    raise AuditLogError(
        f"audit detail {name!r} has type {type(value).__name__}; use a string, "
        "number, boolean, None or a list of these"
    )


def _canonical(value: Mapping[str, Any]) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
