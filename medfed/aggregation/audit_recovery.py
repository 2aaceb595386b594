"""Append the audit entries that a crash kept the service from writing.

The service commits each change to the SQLite store first and appends its
audit entry afterwards, so a crash (SIGKILL, power loss) between the two
leaves a stored change that the audit log does not list. A retried request
that the service recognises as a duplicate writes no entry either.
``reconcile_audit`` runs when the service starts, before it takes requests.
It compares the store's changes with the log's entries by their identity and
appends one entry for each change that the log lacks. Each appended entry has
the change's usual event, actor and details, plus ``recovered: true`` and,
where the store kept it, ``stored_at``: the time the change was stored
(UTC, ISO 8601).

The identities of the changes the log lists are kept in the store's
``audit_keys`` table, and ``audit_checkpoint`` records the log's entry count,
head hash and size at the last reconciliation. A start therefore parses only
the entries appended since then. When the log no longer continues the
checkpoint's chain (an operator started a new log after a broken one), the
whole log is parsed again and every stored change it lacks is appended.

Changes and their identities (kind, study, number, site):

- ``update.accepted`` of a round upload: ``upload``, round, site;
- ``update.accepted`` of an asynchronous arrival: ``arrival``, base version,
  site;
- ``model.registered``: ``model``, version;
- ``round.opened``, ``round.finalized``, ``round.aborted`` and
  ``aggregate.decrypted``: the event, round;
- ``site.withdrawn`` from a masking round: the event, round, site.
"""

import json
import logging
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.aggregation.store import Store

if TYPE_CHECKING:
    from medfed.aggregation.security import ServiceSecurity

__all__ = ["RecoveredEntry", "reconcile_audit"]

logger = logging.getLogger(__name__)

AuditKey = tuple[str, str, int, str]

_ROUND_EVENTS = frozenset(
    {"round.opened", "round.finalized", "round.aborted", "aggregate.decrypted"}
)


@dataclass(frozen=True)
class RecoveredEntry:
    """An audit entry that a stored change lacked, in the order to append it.

    Attributes:
        order: the time the change was stored (seconds since the epoch),
            then a rank that keeps a round's ``round.finalized`` before its
            ``model.registered``.
        stored_at: the stored time written into the entry, or None when
            the store has no time of the change itself.
    """

    order: tuple[float, int]
    key: AuditKey
    event: str
    actor: str
    details: dict[str, Any]
    stored_at: float | None

    def entry_details(self) -> dict[str, Any]:
        details = {**self.details, "recovered": True}
        if self.stored_at is not None:
            details["stored_at"] = _iso(self.stored_at)
        return details


def reconcile_audit(store: Store, security: "ServiceSecurity") -> list[RecoveredEntry]:
    """Append an entry for every stored change that the audit log lacks.

    Call it at start, before the service takes requests, because it reads
    the log's tail and the store without holding the handlers' locks.
    Returns the entries it appended, oldest change first.
    """
    log = security.audit
    logged_keys, full_scan = _read_log_keys(store, log.path, log.entries)
    with store.transaction() as connection:
        if full_scan:
            connection.execute("DELETE FROM audit_keys")
        _insert_keys(connection, logged_keys)
        missing = sorted(_missing_entries(connection), key=lambda item: item.order)
    for item in missing:
        security.record(item.event, item.actor, item.entry_details())
    with store.transaction() as connection:
        _insert_keys(connection, [item.key for item in missing])
        connection.execute(
            "INSERT OR REPLACE INTO audit_checkpoint (id, entries, head, size)"
            " VALUES (1, ?, ?, ?)",
            (log.entries, log.head(), log.path.stat().st_size),
        )
    if missing:
        logger.warning(
            "appended %d audit entries for changes stored before a crash: %s",
            len(missing),
            ", ".join(sorted({item.event for item in missing})),
        )
    return missing


def _read_log_keys(
    store: Store, path: Path, entries: int
) -> tuple[list[AuditKey], bool]:
    """Return the keys of the entries after the checkpoint, and whether all were read.

    ``AuditLog`` verified the whole chain when it opened the file, so a
    tail whose first entry links to the checkpoint's head hash continues
    the chain that the checkpoint indexed.
    """
    with store.transaction() as connection:
        row = connection.execute(
            "SELECT entries, head, size FROM audit_checkpoint WHERE id = 1"
        ).fetchone()
    offset = 0
    if row is not None and _continues(path, entries, *row):
        offset = row[2]
    with path.open("rb") as stream:
        stream.seek(offset)
        tail = stream.read()
    keys = [key for key in map(_entry_key, _entries(tail)) if key is not None]
    return keys, offset == 0


def _continues(path: Path, entries: int, seen: int, head: str, size: int) -> bool:
    if entries < seen or path.stat().st_size < size:
        return False
    with path.open("rb") as stream:
        stream.seek(size)
        first = stream.readline()
    if not first:
        return entries == seen
    try:
        entry = json.loads(first)
        return bool(entry["seq"] == seen + 1 and entry["prev_hash"] == head)
    except (ValueError, TypeError, KeyError):
        # A different log whose bytes at the old size fall inside an entry.
        return False


def _entries(data: bytes) -> Iterator[Mapping[str, Any]]:
    for line in data.splitlines():
        entry = json.loads(line)
        if isinstance(entry, dict):
            yield entry


def _entry_key(entry: Mapping[str, Any]) -> AuditKey | None:
    """Return the identity of the change an entry records, or None for other events."""
    event, actor, details = entry["event"], entry["actor"], entry["details"]
    study = details.get("study")
    if not isinstance(study, str):
        return None
    if event == "update.accepted":
        if isinstance(details.get("round"), int):
            return ("upload", study, details["round"], actor)
        if isinstance(details.get("base_version"), int):
            return ("arrival", study, details["base_version"], actor)
        return None
    if event == "model.registered" and isinstance(details.get("version"), int):
        return ("model", study, details["version"], "")
    if not isinstance(details.get("round"), int):
        return None
    if event in _ROUND_EVENTS:
        return (event, study, details["round"], "")
    if event == "site.withdrawn" and isinstance(details.get("site"), str):
        return (event, study, details["round"], details["site"])
    return None


def _insert_keys(connection: sqlite3.Connection, keys: list[AuditKey]) -> None:
    connection.executemany(
        "INSERT OR IGNORE INTO audit_keys (kind, study, number, site)"
        " VALUES (?, ?, ?, ?)",
        keys,
    )


def _unlogged(kind: str, study: str, number: str, site: str = "''") -> str:
    """Return an SQL condition: no audit key matches these column expressions."""
    return (
        "NOT EXISTS (SELECT 1 FROM audit_keys k WHERE"
        f" k.kind = {kind} AND k.study = {study} AND k.number = {number}"
        f" AND k.site = {site})"
    )


def _missing_entries(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    yield from _missing_uploads(connection)
    yield from _missing_arrivals(connection)
    yield from _missing_openings(connection)
    yield from _missing_closings(connection)
    yield from _missing_models(connection)
    yield from _missing_decryptions(connection)
    yield from _missing_withdrawals(connection)


def _missing_uploads(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    # A masked envelope is in one of the two tables, never both.
    for table in ("uploads", "masked_uploads"):
        rows = connection.execute(
            "SELECT study, round, site, sha256, sample_count, received_at"
            f" FROM {table} u WHERE "
            + _unlogged("'upload'", "u.study", "u.round", "u.site")
        )
        for study, round_number, site, sha256, sample_count, received_at in rows:
            details = {
                "study": study,
                "round": round_number,
                "receipt": sha256[:32],
                "sha256": sha256,
                "sample_count": sample_count,
            }
            yield RecoveredEntry(
                (received_at, 0),
                ("upload", study, round_number, site),
                "update.accepted",
                site,
                details,
                received_at,
            )


def _missing_arrivals(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    rows = connection.execute(
        "SELECT study, site, base_version, staleness, sha256, sample_count,"
        " received_at FROM arrivals a WHERE "
        + _unlogged("'arrival'", "a.study", "a.base_version", "a.site")
    )
    for study, site, base_version, staleness, sha256, sample_count, received in rows:
        details = {
            "study": study,
            "base_version": base_version,
            "staleness": staleness,
            "receipt": sha256[:32],
            "sha256": sha256,
            "sample_count": sample_count,
            "duplicate": False,
        }
        yield RecoveredEntry(
            (received, 0),
            ("arrival", study, base_version, site),
            "update.accepted",
            site,
            details,
            received,
        )


def _missing_openings(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    opened = connection.execute(
        "SELECT study, round, sites, quorum, deadline_at, opened_at FROM rounds r"
        " WHERE " + _unlogged("'round.opened'", "r.study", "r.round")
    )
    for study, round_number, sites, quorum, deadline_at, opened_at in opened:
        details = {
            "study": study,
            "round": round_number,
            "sites": json.loads(sites),
            "quorum": quorum,
            "deadline_seconds": round(deadline_at - opened_at, 3),
        }
        yield RecoveredEntry(
            (opened_at, 0),
            ("round.opened", study, round_number, ""),
            "round.opened",
            "coordinator",
            details,
            opened_at,
        )


def _missing_closings(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    closed = connection.execute(
        "SELECT study, round, state, reason, closed_at FROM rounds r"
        " WHERE state != 'open' AND "
        + _unlogged("'round.' || r.state", "r.study", "r.round")
    ).fetchall()
    for study, round_number, state, reason, closed_at in closed:
        event = f"round.{state}"
        details: dict[str, Any] = {"study": study, "round": round_number}
        if state == "aborted":
            details["reason"] = reason
        else:
            details["sites"] = [
                row[0]
                for row in connection.execute(
                    "SELECT site FROM uploads WHERE study = ? AND round = ?"
                    " ORDER BY site",
                    (study, round_number),
                )
            ]
        yield RecoveredEntry(
            (closed_at, 1),
            (event, study, round_number, ""),
            event,
            "coordinator",
            details,
            closed_at,
        )


def _missing_models(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    # A round's model sorts by the round's closing time, just after
    # round.finalized, as the finalize route records them.
    rows = connection.execute(
        "SELECT m.study, m.version, m.sha256, m.round, m.participants, m.created_at,"
        " (SELECT closed_at FROM rounds r WHERE r.study = m.study AND r.round = m.round)"
        " FROM models m WHERE " + _unlogged("'model'", "m.study", "m.version")
    )
    for study, version, sha256, round_number, participants, created_at, closed in rows:
        details: dict[str, Any] = {"study": study, "version": version, "sha256": sha256}
        actor = "aggregation"
        if round_number is not None:
            details = {"study": study, "round": round_number, **details}
        elif version == 0:
            actor = "coordinator"
        else:
            details["sites"] = json.loads(participants)
        sort_time = closed if closed is not None else created_at
        yield RecoveredEntry(
            (sort_time, 2),
            ("model", study, version, ""),
            "model.registered",
            actor,
            details,
            created_at,
        )


def _missing_decryptions(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    rows = connection.execute(
        "SELECT study, round, decrypted_by, decrypted_sha256, closed_at FROM ckks_sums c"
        " WHERE decrypted IS NOT NULL AND "
        + _unlogged("'aggregate.decrypted'", "c.study", "c.round")
    )
    for study, round_number, site, sha256, closed_at in rows:
        # The store keeps when uploads closed, not when the sum was decrypted,
        # so the entry has no stored_at.
        yield RecoveredEntry(
            (closed_at, 1),
            ("aggregate.decrypted", study, round_number, ""),
            "aggregate.decrypted",
            site or "unknown",
            {"study": study, "round": round_number, "sha256": sha256},
            None,
        )


def _missing_withdrawals(connection: sqlite3.Connection) -> Iterator[RecoveredEntry]:
    rows = connection.execute(
        "SELECT study, round, site, MIN(received_at) FROM masking_messages m"
        " WHERE kind = 'withdrawal' AND "
        + _unlogged("'site.withdrawn'", "m.study", "m.round", "m.site")
        + " GROUP BY study, round, site"
    )
    for study, round_number, site, received_at in rows:
        # The store does not keep who asked for the withdrawal or the phase.
        yield RecoveredEntry(
            (received_at, 0),
            ("site.withdrawn", study, round_number, site),
            "site.withdrawn",
            "unknown",
            {"study": study, "round": round_number, "site": site},
            received_at,
        )


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")
