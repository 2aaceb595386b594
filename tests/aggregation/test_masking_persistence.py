"""Masking rounds saved in the service's SQLite store and restored from it.

Each test reopens the store and builds a new ``MaskingRounds`` from it, as
the service does when it restarts, and drives the round with the calls the
HTTP routes make.
"""

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medfed.aggregation.secagg_routes import (
    MaskingRounds,
    RoundAbortedError,
    StateNotSavedError,
    _add_masked_envelope,
)
from medfed.aggregation.secure_rounds import accept_masked_upload
from medfed.aggregation.store import Store, StoredUpload
from medfed.contract.secagg import (
    FixedPointEncoding,
    MaskingSite,
    VectorLayout,
    to_ring,
)
from medfed.contract.wire import EnvelopeLimits, decode_envelope, encode_envelope
from medfed.errors import SecureAggregationError

STUDY = "heart"
ROUND = 3
SITES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
ENCODING = FixedPointEncoding(fractional_bits=8, clip=8.0, max_weight=50, site_count=5)
SHAPES = {"bias": (2,), "weight": (2, 3)}
LAYOUT = VectorLayout.from_shapes(SHAPES)
SAMPLE_COUNTS = {name: 10 + index for index, name in enumerate(SITES)}


def site_update(index: int) -> dict[str, np.ndarray]:
    """Return integer-valued tensors, which fixed point encodes exactly."""
    return {
        "bias": np.array([index, -index], np.float32),
        "weight": np.arange(6, dtype=np.float32).reshape(2, 3) - index,
    }


def expected_sum(survivors: list[str]) -> np.ndarray:
    total = np.zeros(LAYOUT.length)
    for name in survivors:
        update = site_update(SITES.index(name))
        total += SAMPLE_COUNTS[name] * LAYOUT.flatten(update)
    return total


class Federation:
    """Five sites and a service whose masking rounds live in one SQLite file."""

    def __init__(self, path: Path, key_exchange_seconds: float | None = None) -> None:
        self.path = path
        self.store = Store(path)
        self.rounds = MaskingRounds(store=self.store)
        self.sites = {
            name: MaskingSite(
                site=name, study=STUDY, round_number=ROUND, encoding=ENCODING
            )
            for name in SITES
        }
        self.envelopes: dict[str, bytes] = {}
        # Each site's messages, so a retry sends the same message again.
        self.sent: dict[tuple[str, str], Any] = {}
        self.rounds.open(
            STUDY,
            ROUND,
            sites=SITES,
            threshold=3,
            encoding=ENCODING,
            layout=LAYOUT,
            deadline_at=time.time() + 600,
            opened_at=time.time(),
            key_exchange_seconds=key_exchange_seconds,
        )

    def restart(self) -> int:
        """Drop this process's rounds and restore them from the store."""
        self.store.close()
        self.store = Store(self.path)
        self.rounds = MaskingRounds(store=self.store)
        return self.rounds.restore_saved()

    def phase(self) -> str:
        with self.rounds.edit(STUDY, ROUND) as entry:
            return entry.server.phase_name

    def message_count(self) -> int:
        with sqlite3.connect(self.path) as connection:
            row = connection.execute("SELECT COUNT(*) FROM masking_messages").fetchone()
        return int(row[0])

    # The calls each route makes.

    def advertise(self, name: str) -> None:
        key = ("advertisement", name)
        if key not in self.sent:
            self.sent[key] = self.sites[name].advertise()
        with self.rounds.edit(STUDY, ROUND) as entry:
            entry.server.add_advertisement(self.sent[key])
            entry.close_complete_phase()

    def share(self, name: str) -> None:
        key = ("shares", name)
        if key not in self.sent:
            with self.rounds.edit(STUDY, ROUND) as entry:
                roster = entry.server.roster
            self.sent[key] = self.sites[name].share_keys(roster)
        with self.rounds.edit(STUDY, ROUND) as entry:
            entry.server.add_share_upload(self.sent[key])
            entry.close_complete_phase()

    def receive_shares(self, name: str) -> None:
        with self.rounds.edit(STUDY, ROUND) as entry:
            shares = entry.server.shares_for(name)
        self.sites[name].receive_shares(shares)

    def envelope(self, name: str) -> bytes:
        if name not in self.envelopes:
            masked = self.sites[name].mask_update(
                site_update(SITES.index(name)), sample_count=SAMPLE_COUNTS[name]
            )
            self.envelopes[name] = encode_envelope(
                masked,
                study=STUDY,
                round_number=ROUND,
                site=name,
                sample_count=SAMPLE_COUNTS[name],
                nonce=f"{SITES.index(name):032x}",
                codec_name="masked",
                codec_params=ENCODING.codec_params,
            )
        return self.envelopes[name]

    def upload(self, name: str) -> None:
        """Upload as the service's upload route does, into table uploads."""
        body = self.envelope(name)
        decoded = decode_envelope(body, EnvelopeLimits())
        stored = StoredUpload(
            site=name,
            sha256=hashlib.sha256(body).hexdigest(),
            nonce=decoded.header.nonce,
            sample_count=decoded.header.sample_count,
            size=len(body),
            envelope=body,
            received_at=time.time(),
        )
        accept_masked_upload(self.rounds, STUDY, ROUND, decoded, stored)

    def upload_masked(self, name: str) -> None:
        """Upload as ``PUT /masked/{site}`` does, into table masked_uploads."""
        _add_masked_envelope(self.rounds, self.envelope(name), STUDY, ROUND, name)

    def withdraw(self, name: str) -> None:
        with self.rounds.edit(STUDY, ROUND) as entry:
            entry.server.withdraw(name)
            entry.close_complete_phase()

    def reveal(self, name: str) -> None:
        key = ("reveal", name)
        if key not in self.sent:
            with self.rounds.edit(STUDY, ROUND) as entry:
                request = entry.server.reveal_request
            self.sent[key] = self.sites[name].reveal(request)
        with self.rounds.edit(STUDY, ROUND) as entry:
            entry.server.add_reveal(self.sent[key])


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    return Federation(tmp_path / "aggregation.sqlite3")


def run_round_with_restarts(federation: Federation) -> list[str]:
    """Run the round, restarting after every step; return the phases seen."""
    phases = []

    def restart() -> None:
        before = federation.phase()
        assert federation.restart() == 1
        after = federation.phase()
        assert after == before
        phases.append(after)

    # site-e leaves before the roster closes, site-d after sharing its keys.
    for name in SITES:
        federation.advertise(name)
        restart()
    federation.withdraw("site-e")
    restart()
    for name in SITES[:4]:
        federation.share(name)
        restart()
    for name in SITES[:4]:
        federation.receive_shares(name)
    federation.upload("site-a")
    restart()
    federation.upload_masked("site-b")
    restart()
    federation.upload("site-c")
    restart()
    federation.withdraw("site-d")
    restart()
    for name in SITES[:3]:
        federation.reveal(name)
        restart()
    return phases


def test_restore_in_every_phase(federation: Federation) -> None:
    phases = run_round_with_restarts(federation)
    with federation.rounds.edit(STUDY, ROUND) as entry:
        request = entry.server.reveal_request

    result = federation.rounds.unmask(STUDY, ROUND)

    assert phases[0] == "advertising"
    assert "sharing" in phases
    assert "uploading" in phases
    assert phases[-1] == "revealing"
    assert request.survivors == ["site-a", "site-b", "site-c"]
    assert request.dropped == ["site-d"]
    assert result.survivors == ("site-a", "site-b", "site-c")
    np.testing.assert_array_equal(
        result.weighted_sum, expected_sum(["site-a", "site-b", "site-c"])
    )
    assert result.sample_count == 10 + 11 + 12


def test_unmasked_round_not_restored(federation: Federation) -> None:
    run_round_with_restarts(federation)
    federation.rounds.unmask(STUDY, ROUND)

    restored = federation.restart()

    assert restored == 0
    with pytest.raises(SecureAggregationError, match="no masking round 3"):
        federation.phase()


def test_retries_after_restore_counted_once(federation: Federation) -> None:
    for name in SITES:
        federation.advertise(name)
    # This withdrawal closes advertising, so the retries come in later phases.
    federation.withdraw("site-e")
    federation.restart()
    federation.advertise("site-d")
    for name in SITES[:4]:
        federation.share(name)
    federation.restart()
    federation.share("site-a")
    for name in SITES[:4]:
        federation.receive_shares(name)
    federation.upload("site-a")
    federation.upload_masked("site-b")
    federation.restart()
    count = federation.message_count()
    federation.upload_masked("site-b")
    federation.withdraw("site-e")
    assert federation.message_count() == count
    federation.upload("site-c")
    federation.upload("site-d")
    federation.reveal("site-a")
    federation.restart()
    count = federation.message_count()
    federation.reveal("site-a")
    assert federation.message_count() == count
    for name in SITES[1:4]:
        federation.reveal(name)

    result = federation.rounds.unmask(STUDY, ROUND)

    survivors = ["site-a", "site-b", "site-c", "site-d"]
    assert result.survivors == tuple(survivors)
    np.testing.assert_array_equal(result.weighted_sum, expected_sum(survivors))
    assert result.sample_count == sum(SAMPLE_COUNTS[name] for name in survivors)


def test_different_message_after_restore_rejected(federation: Federation) -> None:
    federation.advertise("site-a")
    federation.restart()
    # A site that lost its state sends new keys, not a retry.
    federation.sites["site-a"] = MaskingSite(
        site="site-a", study=STUDY, round_number=ROUND, encoding=ENCODING
    )
    del federation.sent[("advertisement", "site-a")]

    with pytest.raises(SecureAggregationError, match="already advertised"):
        federation.advertise("site-a")


def test_abort_reason_survives_restart(federation: Federation) -> None:
    federation.advertise("site-a")
    assert federation.rounds.abort(STUDY, ROUND, "the coordinator stopped")

    restored = federation.restart()

    assert restored == 0
    with pytest.raises(RoundAbortedError, match="the coordinator stopped"):
        federation.phase()


def test_failed_save_leaves_round_unchanged(federation: Federation) -> None:
    federation.advertise("site-a")
    # A read-only connection makes the next write fail inside SQLite.
    federation.store._connection.execute("PRAGMA query_only = 1")

    with pytest.raises(StateNotSavedError, match="send it again"):
        federation.advertise("site-b")

    with federation.rounds.edit(STUDY, ROUND) as entry:
        assert entry.server.advertised_sites == ["site-a"]
    federation.store._connection.execute("PRAGMA query_only = 0")
    federation.advertise("site-b")
    federation.restart()
    with federation.rounds.edit(STUDY, ROUND) as entry:
        assert entry.server.advertised_sites == ["site-a", "site-b"]


def stored_values(path: Path) -> list[bytes]:
    """Return every value of every row of every table, as bytes."""
    values = []
    with sqlite3.connect(path) as connection:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        ]
        for table in tables:
            for row in connection.execute(f"SELECT * FROM {table}"):
                for value in row:
                    if isinstance(value, bytes):
                        values.append(value)
                    elif value is not None:
                        values.append(str(value).encode())
    return values


def test_store_holds_no_unmasked_update(federation: Federation) -> None:
    run_round_with_restarts(federation)
    values = stored_values(federation.path)
    masked_site_a = LAYOUT.join(
        decode_envelope(federation.envelope("site-a"), EnvelopeLimits()).tensors
    )

    # The scan finds a masked vector, so it would find an unmasked one.
    assert any(masked_site_a.tobytes() in value for value in values)
    for name in SITES[:4]:
        update = site_update(SITES.index(name))
        flat = LAYOUT.flatten(update)
        encoded = to_ring(
            ENCODING.encode(flat, weight=SAMPLE_COUNTS[name]), ENCODING.ring_bits
        )
        plain_forms = {
            "float32 update": b"".join(
                update[tensor].tobytes() for tensor, _ in LAYOUT.shapes
            ),
            "float64 update": flat.tobytes(),
            "encoded update": encoded.tobytes(),
        }
        for form, plain in plain_forms.items():
            assert not any(plain in value for value in values), (name, form)


def run_until_two_uploads(federation: Federation) -> None:
    for name in SITES:
        federation.advertise(name)
    for name in SITES:
        federation.share(name)
    for name in SITES:
        federation.receive_shares(name)
    federation.upload("site-a")
    federation.upload_masked("site-b")


# Each case changes the saved round between runs, as a damaged disk or a
# person editing the file would, and names the reason the restore logs.
CORRUPTIONS = {
    "setup not JSON": (
        "UPDATE masking_rounds SET setup = substr(setup, 1, 20)",
        "masking round setup is malformed",
    ),
    "setup with negative shape": (
        "UPDATE masking_rounds SET setup = "
        """json_set(setup, '$.layout', json('[["bias", [-1]]]'))""",
        "masking round setup does not open a round",
    ),
    "setup without sites": (
        "UPDATE masking_rounds SET setup = json_set(setup, '$.sites', json('[]'))",
        "is not one of the round's sites",
    ),
    "sample count changed": (
        "UPDATE masking_messages SET body = '{\"sample_count\": 20}'"
        " WHERE kind = 'masked' AND site = 'site-a'",
        "but the round saved \\('heart', 3, 'site-a', 20\\)",
    ),
    "envelopes swapped": (
        "UPDATE uploads SET envelope = (SELECT envelope FROM masked_uploads)"
        " WHERE site = 'site-a'",
        "has study, round, site and sample count \\('heart', 3, 'site-b', 11\\)",
    ),
    "envelope stored as text": (
        "UPDATE uploads SET envelope = 'not an envelope' WHERE site = 'site-a'",
        "masked envelope of site 'site-a' is missing",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_corrupted_state_aborts_round(
    federation: Federation, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    statement, reason = CORRUPTIONS[corruption]
    run_until_two_uploads(federation)
    federation.store.close()
    with sqlite3.connect(federation.path) as connection:
        assert connection.execute(statement).rowcount == 1

    federation.store = Store(federation.path)
    federation.rounds = MaskingRounds(store=federation.store)
    with caplog.at_level("ERROR"):
        restored = federation.rounds.restore_saved()

    assert restored == 0
    assert any(
        "aborted masking round 3 of study heart" in record.getMessage()
        for record in caplog.records
    )
    with pytest.raises(RoundAbortedError, match=reason):
        federation.phase()
    saved = federation.store.masking_round(STUDY, ROUND, with_messages=False)
    assert saved is not None
    assert saved.state == "aborted"


def test_key_exchange_deadlines_survive_restart(tmp_path: Path) -> None:
    federation = Federation(tmp_path / "state.sqlite3", key_exchange_seconds=5)
    saved = federation.store.masking_round(STUDY, ROUND, with_messages=False)
    assert saved is not None
    opened_at = json.loads(saved.setup)["opened_at"]
    with federation.rounds.edit(STUDY, ROUND) as entry:
        advertising_deadline = entry.phase_deadline()
    for name in SITES:
        federation.advertise(name)
    with federation.rounds.edit(STUDY, ROUND) as entry:
        closed_at = entry.server.advertising_closed_at
        sharing_deadline = entry.phase_deadline()

    restored = federation.restart()

    assert restored == 1
    assert advertising_deadline == opened_at + 5
    assert closed_at is not None
    assert sharing_deadline == closed_at + 5
    with federation.rounds.edit(STUDY, ROUND) as entry:
        assert entry.server.phase_name == "sharing"
        assert entry.advertising_deadline_at == opened_at + 5
        assert entry.server.advertising_closed_at == closed_at
        assert entry.phase_deadline() == closed_at + 5


def test_setup_without_key_exchange_deadlines(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    federation = Federation(path, key_exchange_seconds=5)
    for name in SITES:
        federation.advertise(name)
    federation.store.close()
    # A round saved before the key-exchange deadline existed.
    with sqlite3.connect(path) as connection:
        connection.execute(
            "UPDATE masking_rounds SET setup = json_remove(setup, "
            "'$.opened_at', '$.key_exchange_seconds')"
        )
        connection.execute(
            "UPDATE masking_messages SET body = NULL WHERE kind = 'advertising_closed'"
        )
        (deadline,) = connection.execute(
            "SELECT json_extract(setup, '$.deadline_at') FROM masking_rounds"
        ).fetchone()
    rounds = MaskingRounds(store=Store(path))

    restored = rounds.restore_saved()

    assert restored == 1
    with rounds.edit(STUDY, ROUND) as entry:
        assert entry.server.phase_name == "sharing"
        assert entry.advertising_deadline_at is None
        assert entry.sharing_seconds is None
        assert entry.server.advertising_closed_at is None
        assert entry.phase_deadline() == deadline


def test_overdue_sharing_closes_without_silent_site(
    federation: Federation,
) -> None:
    for name in SITES:
        federation.advertise(name)
    for name in SITES[:4]:
        federation.share(name)
    with federation.rounds.edit(STUDY, ROUND) as entry:
        entry.sharing_seconds = 0.0
        entry.close_overdue_phase()
        sharing = entry.server.sharing_sites
        phase = entry.server.phase_name

    assert phase == "uploading"
    assert sharing == SITES[:4]
