"""Durable state of the aggregation service, in one SQLite database.

Every change is one transaction, so after a crash the service restarts with
each upload either fully accepted or absent, never half-written or counted
twice. Tables: studies (config and strategy state), models (every global model
version with its SHA-256), published (the tensors a strategy publishes to
sites with a model version, such as SCAFFOLD's control variate), rounds
(state, participants, quorum, deadline), uploads (the accepted envelopes),
ckks_sums (for studies with ``secure_aggregation: ckks``, the encrypted sum of
a round whose uploads have closed, and the sum a site decrypted from it), and
arrivals (for asynchronous studies, every accepted update with the version it
was trained from; those not yet aggregated form the buffer).

Studies with ``secure_aggregation: masking`` add masking_rounds (each masking
round's sites, threshold, encoding, layout, deadline and state),
masking_messages (every change the round acknowledged, in order, so that a
restart replays them) and masked_uploads (masked envelopes sent to the
masking route rather than the upload route). A masked envelope is stored
once, in uploads or masked_uploads, never inside a message.

Two tables serve the audit log's recovery after a crash (see
``audit_recovery``): audit_keys (the identity of every stored change that the
audit log records) and audit_checkpoint (how far into the log audit_keys
reaches).
"""

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Arrival",
    "AsyncPublication",
    "EncryptedSum",
    "MaskedUploadTable",
    "MaskingMessage",
    "ModelVersion",
    "RoundRecord",
    "SavedMaskingRound",
    "Store",
    "StoredUpload",
    "StudyRecord",
    "UploadsClosedError",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    strategy_state BLOB,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    study TEXT NOT NULL,
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    weights BLOB NOT NULL,
    round INTEGER,
    participants TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (study, version)
);
CREATE TABLE IF NOT EXISTS published (
    study TEXT NOT NULL,
    version INTEGER NOT NULL,
    tensors BLOB NOT NULL,
    PRIMARY KEY (study, version)
);
CREATE TABLE IF NOT EXISTS rounds (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'finalized', 'aborted')),
    sites TEXT NOT NULL,
    quorum INTEGER NOT NULL,
    deadline_at REAL NOT NULL,
    base_version INTEGER NOT NULL,
    result_version INTEGER,
    reason TEXT,
    opened_at REAL NOT NULL,
    closed_at REAL,
    PRIMARY KEY (study, round)
);
CREATE TABLE IF NOT EXISTS uploads (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    nonce TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    size INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (study, round, site)
);
CREATE TABLE IF NOT EXISTS arrivals (
    study TEXT NOT NULL,
    site TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    staleness INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    nonce TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    size INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    received_at REAL NOT NULL,
    aggregated_version INTEGER,
    PRIMARY KEY (study, site, base_version)
);
CREATE TABLE IF NOT EXISTS ckks_sums (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    contributors TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    ciphertexts BLOB,
    decrypted BLOB,
    decrypted_sha256 TEXT,
    decrypted_by TEXT,
    closed_at REAL NOT NULL,
    PRIMARY KEY (study, round)
);
CREATE TABLE IF NOT EXISTS masking_rounds (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'unmasked', 'aborted')),
    setup TEXT NOT NULL,
    reason TEXT,
    opened_at REAL NOT NULL,
    closed_at REAL,
    PRIMARY KEY (study, round)
);
CREATE TABLE IF NOT EXISTS masking_messages (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    kind TEXT NOT NULL,
    site TEXT,
    body TEXT,
    received_at REAL NOT NULL,
    PRIMARY KEY (study, round, sequence)
);
CREATE TABLE IF NOT EXISTS masked_uploads (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    nonce TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    size INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (study, round, site)
);
CREATE TABLE IF NOT EXISTS audit_keys (
    kind TEXT NOT NULL,
    study TEXT NOT NULL,
    number INTEGER NOT NULL,
    site TEXT NOT NULL,
    PRIMARY KEY (kind, study, number, site)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    entries INTEGER NOT NULL,
    head TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""

#: The table of a masked envelope: ``uploads`` when it came on the upload
#: route, ``masked_uploads`` when it came on the masking route.
MaskedUploadTable = Literal["uploads", "masked_uploads"]


@dataclass(frozen=True)
class StudyRecord:
    study: str
    settings: dict[str, Any]
    strategy_state: bytes | None


@dataclass(frozen=True)
class ModelVersion:
    study: str
    version: int
    sha256: str
    weights: bytes
    round: int | None
    participants: list[str]


@dataclass(frozen=True)
class RoundRecord:
    study: str
    round: int
    state: str
    sites: list[str]
    quorum: int
    deadline_at: float
    base_version: int
    result_version: int | None
    reason: str | None
    #: Unix time at which the round opened; phase deadlines count from it.
    opened_at: float


@dataclass(frozen=True)
class StoredUpload:
    site: str
    sha256: str
    nonce: str
    sample_count: int
    size: int
    envelope: bytes
    received_at: float

    @property
    def receipt(self) -> str:
        """An identifier of the accepted upload, stable across retries."""
        return self.sha256[:32]


@dataclass(frozen=True)
class Arrival:
    """An accepted update of an asynchronous study.

    Attributes:
        base_version: the global version the site trained from.
        staleness: versions published between ``base_version`` and the
            update's arrival.
        aggregated_version: the version the update went into; None while it
            waits in the buffer.
    """

    site: str
    base_version: int
    staleness: int
    upload: StoredUpload
    aggregated_version: int | None

    @property
    def receipt(self) -> str:
        return self.upload.receipt


@dataclass(frozen=True)
class EncryptedSum:
    """A CKKS round after its uploads closed.

    Attributes:
        contributors: the sites whose ciphertexts are in the sum, sorted.
        sample_count: their total sample count.
        ciphertexts: the sum as a safetensors file of ``uint8`` ciphertext
            arrays; None while the service is still adding.
        decrypted: the envelope in which a site sent the decrypted sum.
    """

    study: str
    round: int
    contributors: list[str]
    sample_count: int
    ciphertexts: bytes | None
    decrypted: bytes | None
    decrypted_sha256: str | None
    decrypted_by: str | None


@dataclass(frozen=True)
class MaskingMessage:
    """One acknowledged change of a masking round, as replayed after a restart.

    Attributes:
        kind: what changed, such as ``advertisement`` or ``uploads_closed``.
        site: the site that sent the message, or None for a phase close.
        body: the message as JSON; for a masked upload only its sample count,
            because the envelope is stored once, in its own table.
    """

    kind: str
    site: str | None = None
    body: str | None = None


@dataclass(frozen=True)
class SavedMaskingRound:
    """A masking round as the store keeps it.

    Attributes:
        state: ``open``, ``unmasked`` or ``aborted``.
        setup: what opened the round (sites, threshold, encoding, layout,
            deadline) as the stored JSON text, which the reader parses, so
            corrupted text fails that round only.
        reason: why the round was aborted, once it was.
        service_state: the state of the service round with the same study and
            number, or None when the service has no such round.
        messages: the round's acknowledged changes, in order.
        envelopes: the masked envelopes by site, from both upload tables.
    """

    study: str
    round: int
    state: str
    setup: str
    reason: str | None
    service_state: str | None
    messages: list[MaskingMessage]
    envelopes: dict[str, bytes]


class UploadsClosedError(Exception):
    """An upload came after the round's CKKS uploads closed."""


class Store:
    """Transactional access to the service's SQLite database.

    One connection is shared by the service's threads behind a lock; SQLite's
    WAL journal with ``synchronous=FULL`` makes each commit durable.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None
        )
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._connection.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one IMMEDIATE transaction; roll back on error."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    # Studies and models

    def get_study(self, study: str) -> StudyRecord | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT study, settings, strategy_state FROM studies WHERE study = ?",
                (study,),
            ).fetchone()
        if row is None:
            return None
        return StudyRecord(
            study=row[0], settings=json.loads(row[1]), strategy_state=row[2]
        )

    def create_study(
        self, study: str, settings: dict[str, Any], weights: bytes
    ) -> ModelVersion:
        """Create a study with its initial model as version 0."""
        sha256 = hashlib.sha256(weights).hexdigest()
        with self.transaction() as connection:
            connection.execute(
                "INSERT INTO studies (study, settings, created_at) VALUES (?, ?, ?)",
                (study, json.dumps(settings, sort_keys=True), time.time()),
            )
            connection.execute(
                "INSERT INTO models (study, version, sha256, weights, round, participants,"
                " created_at) VALUES (?, 0, ?, ?, NULL, '[]', ?)",
                (study, sha256, weights, time.time()),
            )
        return ModelVersion(study, 0, sha256, weights, None, [])

    def get_model(self, study: str, version: int | None = None) -> ModelVersion | None:
        """Return model ``version`` of ``study``, or its latest when None."""
        query = "SELECT version, sha256, weights, round, participants FROM models WHERE study = ?"
        parameters: tuple[Any, ...] = (study,)
        if version is None:
            query += " ORDER BY version DESC LIMIT 1"
        else:
            query += " AND version = ?"
            parameters += (version,)
        with self._lock:
            row = self._connection.execute(query, parameters).fetchone()
        if row is None:
            return None
        return ModelVersion(study, row[0], row[1], row[2], row[3], json.loads(row[4]))

    def get_published(self, study: str, version: int) -> bytes | None:
        """Return the safetensors file published with model ``version``, if any."""
        with self._lock:
            row = self._connection.execute(
                "SELECT tensors FROM published WHERE study = ? AND version = ?",
                (study, version),
            ).fetchone()
        return None if row is None else bytes(row[0])

    # Rounds

    def get_round(self, study: str, round_number: int) -> RoundRecord | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT state, sites, quorum, deadline_at, base_version, result_version,"
                " reason, opened_at FROM rounds WHERE study = ? AND round = ?",
                (study, round_number),
            ).fetchone()
        if row is None:
            return None
        return RoundRecord(
            study,
            round_number,
            row[0],
            json.loads(row[1]),
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
        )

    def latest_round(self, study: str) -> RoundRecord | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT MAX(round) FROM rounds WHERE study = ?", (study,)
            ).fetchone()
        return None if row[0] is None else self.get_round(study, row[0])

    def open_round(
        self,
        study: str,
        round_number: int,
        sites: list[str],
        quorum: int,
        deadline_at: float,
    ) -> RoundRecord:
        with self.transaction() as connection:
            base = connection.execute(
                "SELECT MAX(version) FROM models WHERE study = ?", (study,)
            ).fetchone()[0]
            connection.execute(
                "INSERT INTO rounds (study, round, state, sites, quorum, deadline_at,"
                " base_version, opened_at) VALUES (?, ?, 'open', ?, ?, ?, ?, ?)",
                (
                    study,
                    round_number,
                    json.dumps(sites),
                    quorum,
                    deadline_at,
                    base,
                    time.time(),
                ),
            )
        record = self.get_round(study, round_number)
        assert record is not None
        return record

    def close_round(
        self,
        study: str,
        round_number: int,
        *,
        state: str,
        reason: str | None = None,
        model: tuple[bytes, list[str]] | None = None,
        strategy_state: bytes | None = None,
        published_tensors: bytes | None = None,
    ) -> ModelVersion | None:
        """Mark a round finalized (publishing ``model``) or aborted, atomically.

        ``published_tensors`` (a safetensors file) is stored with the new
        model version. Returns the new model version when one was published.
        """
        published = None
        with self.transaction() as connection:
            if model is not None:
                weights, participants = model
                version = (
                    connection.execute(
                        "SELECT MAX(version) FROM models WHERE study = ?", (study,)
                    ).fetchone()[0]
                    + 1
                )
                sha256 = hashlib.sha256(weights).hexdigest()
                connection.execute(
                    "INSERT INTO models (study, version, sha256, weights, round, participants,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (study, version, sha256, weights, round_number, json.dumps(participants),
                     time.time()),
                )  # fmt: skip
                published = ModelVersion(
                    study, version, sha256, weights, round_number, participants
                )
                if published_tensors is not None:
                    connection.execute(
                        "INSERT INTO published (study, version, tensors)"
                        " VALUES (?, ?, ?)",
                        (study, version, published_tensors),
                    )
            if strategy_state is not None:
                connection.execute(
                    "UPDATE studies SET strategy_state = ? WHERE study = ?",
                    (strategy_state, study),
                )
            connection.execute(
                "UPDATE rounds SET state = ?, reason = ?, result_version = ?, closed_at = ?"
                " WHERE study = ? AND round = ? AND state = 'open'",
                (state, reason, published.version if published else None, time.time(), study,
                 round_number),
            )  # fmt: skip
        return published

    # Uploads

    def get_upload(
        self, study: str, round_number: int, site: str
    ) -> StoredUpload | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT site, sha256, nonce, sample_count, size, envelope, received_at FROM uploads"
                " WHERE study = ? AND round = ? AND site = ?",
                (study, round_number, site),
            ).fetchone()
        return None if row is None else StoredUpload(*row)

    def list_uploads(self, study: str, round_number: int) -> list[StoredUpload]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT site, sha256, nonce, sample_count, size, envelope, received_at FROM uploads"
                " WHERE study = ? AND round = ? ORDER BY site",
                (study, round_number),
            ).fetchall()
        return [StoredUpload(*row) for row in rows]

    def uploaded_sites(self, study: str, round_number: int) -> list[str]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT site FROM uploads WHERE study = ? AND round = ? ORDER BY site",
                (study, round_number),
            ).fetchall()
        return [row[0] for row in rows]

    def add_upload(self, study: str, round_number: int, upload: StoredUpload) -> None:
        """Store an accepted upload.

        Raises:
            UploadsClosedError: the round's CKKS uploads have closed; checked
                in the same transaction, so no upload slips in after the sum's
                contributors were fixed.
        """
        with self.transaction() as connection:
            closed = connection.execute(
                "SELECT 1 FROM ckks_sums WHERE study = ? AND round = ?",
                (study, round_number),
            ).fetchone()
            if closed is not None:
                raise UploadsClosedError(
                    f"round {round_number} of study {study!r} has closed its uploads "
                    "and waits for a site to decrypt the encrypted sum"
                )
            connection.execute(
                "INSERT INTO uploads (study, round, site, sha256, nonce, sample_count, size,"
                " envelope, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study, round_number, upload.site, upload.sha256, upload.nonce,
                 upload.sample_count, upload.size, upload.envelope, upload.received_at),
            )  # fmt: skip

    # Encrypted sums of CKKS rounds

    def get_encrypted_sum(self, study: str, round_number: int) -> EncryptedSum | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT contributors, sample_count, ciphertexts, decrypted,"
                " decrypted_sha256, decrypted_by FROM ckks_sums"
                " WHERE study = ? AND round = ?",
                (study, round_number),
            ).fetchone()
        if row is None:
            return None
        return EncryptedSum(study, round_number, json.loads(row[0]), row[1], *row[2:])

    def close_encrypted_uploads(self, study: str, round_number: int) -> EncryptedSum:
        """Fix the round's contributors: the sites that uploaded so far.

        Idempotent: a round already closed keeps its contributors.
        """
        with self.transaction() as connection:
            rows = connection.execute(
                "SELECT site, sample_count FROM uploads WHERE study = ? AND round = ?"
                " ORDER BY site",
                (study, round_number),
            ).fetchall()
            connection.execute(
                "INSERT OR IGNORE INTO ckks_sums (study, round, contributors,"
                " sample_count, closed_at) VALUES (?, ?, ?, ?, ?)",
                (study, round_number, json.dumps([row[0] for row in rows]),
                 sum(row[1] for row in rows), time.time()),
            )  # fmt: skip
        closed = self.get_encrypted_sum(study, round_number)
        assert closed is not None
        return closed

    def set_encrypted_sum(
        self, study: str, round_number: int, ciphertexts: bytes
    ) -> None:
        with self.transaction() as connection:
            connection.execute(
                "UPDATE ckks_sums SET ciphertexts = ? WHERE study = ? AND round = ?"
                " AND ciphertexts IS NULL",
                (ciphertexts, study, round_number),
            )

    def set_decrypted_sum(
        self, study: str, round_number: int, site: str, envelope: bytes
    ) -> bool:
        """Store the decrypted sum unless one is stored; return whether it was."""
        sha256 = hashlib.sha256(envelope).hexdigest()
        with self.transaction() as connection:
            cursor = connection.execute(
                "UPDATE ckks_sums SET decrypted = ?, decrypted_sha256 = ?,"
                " decrypted_by = ? WHERE study = ? AND round = ? AND decrypted IS NULL"
                " AND ciphertexts IS NOT NULL",
                (envelope, sha256, site, study, round_number),
            )
        return cursor.rowcount == 1

    # Masking rounds

    def open_masking_round(
        self, study: str, round_number: int, setup: dict[str, Any]
    ) -> None:
        """Store a new masking round; one opened again starts with no messages."""
        with self.transaction() as connection:
            for table in ("masking_messages", "masked_uploads"):
                connection.execute(
                    f"DELETE FROM {table} WHERE study = ? AND round = ?",
                    (study, round_number),
                )
            connection.execute(
                "INSERT OR REPLACE INTO masking_rounds (study, round, state, setup,"
                " reason, opened_at, closed_at) VALUES (?, ?, 'open', ?, NULL, ?, NULL)",
                (study, round_number, json.dumps(setup, sort_keys=True), time.time()),
            )

    def append_masking_messages(
        self,
        study: str,
        round_number: int,
        first_sequence: int,
        messages: list[MaskingMessage],
        upload: StoredUpload | None = None,
        upload_table: MaskedUploadTable = "uploads",
    ) -> None:
        """Append a masking round's changes, and the envelope they accepted, at once.

        ``first_sequence`` is the number of messages stored before these; a
        sequence number that is taken fails the whole transaction, so no
        change is stored twice.
        """
        now = time.time()
        with self.transaction() as connection:
            if upload is not None:
                connection.execute(
                    f"INSERT INTO {upload_table} (study, round, site, sha256, nonce,"
                    " sample_count, size, envelope, received_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (study, round_number, upload.site, upload.sha256, upload.nonce,
                     upload.sample_count, upload.size, upload.envelope,
                     upload.received_at),
                )  # fmt: skip
            connection.executemany(
                "INSERT INTO masking_messages (study, round, sequence, kind, site, body,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (study, round_number, first_sequence + offset, message.kind,
                     message.site, message.body, now)
                    for offset, message in enumerate(messages)
                ],
            )  # fmt: skip

    def close_masking_round(
        self, study: str, round_number: int, *, state: str, reason: str | None = None
    ) -> None:
        """Mark an open masking round ``unmasked`` or ``aborted`` with ``reason``."""
        with self.transaction() as connection:
            connection.execute(
                "UPDATE masking_rounds SET state = ?, reason = ?, closed_at = ?"
                " WHERE study = ? AND round = ? AND state = 'open'",
                (state, reason, time.time(), study, round_number),
            )

    def masking_round_keys(self) -> list[tuple[str, int]]:
        """Return the study and number of every stored masking round, oldest first."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT study, round FROM masking_rounds ORDER BY opened_at"
            ).fetchall()
        return [(row[0], row[1]) for row in rows]

    def masking_round(
        self, study: str, round_number: int, *, with_messages: bool = True
    ) -> SavedMaskingRound | None:
        """Return a stored masking round; without messages and envelopes if asked."""
        with self._lock:
            row = self._connection.execute(
                "SELECT m.state, m.setup, m.reason, r.state FROM masking_rounds m"
                " LEFT JOIN rounds r ON r.study = m.study AND r.round = m.round"
                " WHERE m.study = ? AND m.round = ?",
                (study, round_number),
            ).fetchone()
            if row is None:
                return None
            messages: list[MaskingMessage] = []
            envelopes: dict[str, bytes] = {}
            if with_messages:
                messages = [
                    MaskingMessage(*item)
                    for item in self._connection.execute(
                        "SELECT kind, site, body FROM masking_messages"
                        " WHERE study = ? AND round = ? ORDER BY sequence",
                        (study, round_number),
                    )
                ]
                # A value that is not a BLOB is no envelope, and the round
                # reports it missing rather than failing the caller.
                for table in ("uploads", "masked_uploads"):
                    envelopes.update(
                        (site, envelope)
                        for site, envelope in self._connection.execute(
                            f"SELECT site, envelope FROM {table}"
                            " WHERE study = ? AND round = ?",
                            (study, round_number),
                        )
                        if isinstance(envelope, bytes)
                    )
        return SavedMaskingRound(
            study=study,
            round=round_number,
            state=row[0],
            setup=row[1],
            reason=row[2],
            service_state=row[3],
            messages=messages,
            envelopes=envelopes,
        )

    def open_rounds(self) -> list[RoundRecord]:
        """Return every service round that is still open."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT study, round FROM rounds WHERE state = 'open'"
            ).fetchall()
        records = [self.get_round(study, round_number) for study, round_number in rows]
        return [record for record in records if record is not None]

    # Arrivals of asynchronous studies

    def get_arrival(self, study: str, site: str, base_version: int) -> Arrival | None:
        with self._lock:
            row = self._connection.execute(
                _ARRIVAL_QUERY + " AND site = ? AND base_version = ?",
                (study, site, base_version),
            ).fetchone()
        return None if row is None else _arrival(row)

    def list_arrivals(
        self, study: str, *, buffered_only: bool = False
    ) -> list[Arrival]:
        """Return the study's arrivals in the order they were accepted."""
        query = _ARRIVAL_QUERY
        if buffered_only:
            query += " AND aggregated_version IS NULL"
        with self._lock:
            rows = self._connection.execute(
                query + " ORDER BY received_at, rowid", (study,)
            ).fetchall()
        return [_arrival(row) for row in rows]

    def add_arrival(
        self,
        study: str,
        arrival: Arrival,
        *,
        publish: "AsyncPublication | None" = None,
    ) -> ModelVersion | None:
        """Store an accepted arrival and, with ``publish``, the version it completes.

        Publishing marks every buffered arrival, this one included, as
        aggregated into the new version, in the same transaction, so a crash
        leaves either the arrival buffered or the version published with its
        whole buffer, never a buffer counted twice.
        """
        upload = arrival.upload
        published = None
        with self.transaction() as connection:
            connection.execute(
                "INSERT INTO arrivals (study, site, base_version, staleness, sha256,"
                " nonce, sample_count, size, envelope, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study, arrival.site, arrival.base_version, arrival.staleness,
                 upload.sha256, upload.nonce, upload.sample_count, upload.size,
                 upload.envelope, upload.received_at),
            )  # fmt: skip
            if publish is not None:
                version = (
                    connection.execute(
                        "SELECT MAX(version) FROM models WHERE study = ?", (study,)
                    ).fetchone()[0]
                    + 1
                )
                if version != publish.version:
                    raise RuntimeError(
                        f"study {study!r} is at version {version - 1}, but the "
                        f"aggregation computed version {publish.version}"
                    )
                sha256 = hashlib.sha256(publish.weights).hexdigest()
                connection.execute(
                    "INSERT INTO models (study, version, sha256, weights, round,"
                    " participants, created_at) VALUES (?, ?, ?, ?, NULL, ?, ?)",
                    (study, version, sha256, publish.weights,
                     json.dumps(publish.contributors), time.time()),
                )  # fmt: skip
                if publish.published_tensors is not None:
                    connection.execute(
                        "INSERT INTO published (study, version, tensors)"
                        " VALUES (?, ?, ?)",
                        (study, version, publish.published_tensors),
                    )
                if publish.strategy_state is not None:
                    connection.execute(
                        "UPDATE studies SET strategy_state = ? WHERE study = ?",
                        (publish.strategy_state, study),
                    )
                connection.execute(
                    "UPDATE arrivals SET aggregated_version = ?"
                    " WHERE study = ? AND aggregated_version IS NULL",
                    (version, study),
                )
                published = ModelVersion(
                    study, version, sha256, publish.weights, None, publish.contributors
                )
        return published


@dataclass(frozen=True)
class AsyncPublication:
    """A version that an arrival completes, as safetensors bytes."""

    version: int
    weights: bytes
    contributors: list[str]
    strategy_state: bytes | None
    published_tensors: bytes | None


_ARRIVAL_QUERY = (
    "SELECT site, base_version, staleness, sha256, nonce, sample_count, size,"
    " envelope, received_at, aggregated_version FROM arrivals WHERE study = ?"
)


def _arrival(row: tuple[Any, ...]) -> Arrival:
    site, base_version, staleness = row[0], row[1], row[2]
    upload = StoredUpload(site, *row[3:9])
    return Arrival(site, base_version, staleness, upload, row[9])
