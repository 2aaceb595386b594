"""The audit log: hash chain, tamper detection, signed head, CLI."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from medfed.aggregation.audit import GENESIS_HASH, AuditLog, entry_hash, verify
from medfed.contract.signing import Ed25519Signer, public_key_to_base64
from medfed.errors import AuditLogError
from medfed.security_cli import audit_app

ENTRIES = 6


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("round.opened", "coordinator", {"study": "heart", "round": 1})
        for site in ("alpha", "beta"):
            log.append("model.downloaded", site, {"study": "heart", "version": 1})
            log.append("update.accepted", site, {"round": 1, "sample_count": 40})
        log.append(
            "round.finalized", "coordinator", {"round": 1, "sites": ["alpha", "beta"]}
        )
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _rehash(line: bytes, **changes) -> bytes:
    """Return ``line`` with ``changes`` applied and its own hash recomputed."""
    entry = json.loads(line)
    entry.update(changes)
    fields = {
        k: entry[k] for k in ("seq", "time", "event", "actor", "details", "prev_hash")
    }
    entry["hash"] = entry_hash(**fields)
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def test_chain_verifies(log_path: Path) -> None:
    result = verify(log_path)
    assert result.ok
    assert result.entries == ENTRIES
    assert result.broken_at is None
    last = json.loads(_lines(log_path)[-1])
    assert result.head == last["hash"]
    assert json.loads(_lines(log_path)[0])["prev_hash"] == GENESIS_HASH


def test_reopen_continues_chain(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        assert log.entries == ENTRIES
        head = log.head()
        entry = log.append("round.opened", "coordinator", {"round": 2})
    assert entry.seq == ENTRIES + 1
    assert entry.prev_hash == head
    assert verify(log_path).ok


@pytest.mark.parametrize("index", range(ENTRIES))
def test_edited_entry_fails_there(log_path: Path, index: int) -> None:
    lines = _lines(log_path)
    lines[index] = lines[index].replace(b'"actor":"', b'"actor":"x')
    _write(log_path, lines)
    result = verify(log_path)
    assert not result.ok
    assert result.broken_at == index + 1
    assert (
        result.reason
        == "hash does not match the entry's contents: the entry was edited"
    )
    assert result.entries == index


@pytest.mark.parametrize("index", range(ENTRIES - 1))
def test_rehashed_edit_fails_next(log_path: Path, index: int) -> None:
    """An edit with its own hash recomputed breaks the link to the next entry."""
    lines = _lines(log_path)
    lines[index] = _rehash(lines[index], actor="mallory")
    _write(log_path, lines)
    result = verify(log_path)
    assert result.broken_at == index + 2
    assert result.reason == "prev_hash does not match the hash of the previous entry"


@pytest.mark.parametrize("index", range(ENTRIES - 1))
def test_deleted_entry_fails_there(log_path: Path, index: int) -> None:
    lines = _lines(log_path)
    del lines[index]
    _write(log_path, lines)
    result = verify(log_path)
    assert result.broken_at == index + 1
    assert result.reason.startswith(
        f"entry has seq {index + 2} but is line {index + 1}"
    )


@pytest.mark.parametrize("index", range(ENTRIES))
def test_inserted_entry_fails_there(log_path: Path, index: int) -> None:
    lines = _lines(log_path)
    lines.insert(index, lines[(index + 2) % ENTRIES])
    _write(log_path, lines)
    result = verify(log_path)
    assert result.broken_at == index + 1
    assert "seq" in result.reason


def test_forged_insertion_fails_next(log_path: Path) -> None:
    """A forger who fixes seq, prev_hash and hash is caught at the next entry."""
    lines = _lines(log_path)
    previous = json.loads(lines[1])
    forged = _rehash(lines[1], seq=3, prev_hash=previous["hash"], actor="mallory")
    lines.insert(2, forged)
    _write(log_path, lines)
    result = verify(log_path)
    assert result.broken_at == 4
    assert result.reason.startswith("entry has seq 3 but is line 4")


@pytest.mark.parametrize("index", range(ENTRIES - 1))
def test_swapped_entries_fail_there(log_path: Path, index: int) -> None:
    lines = _lines(log_path)
    lines[index], lines[index + 1] = lines[index + 1], lines[index]
    _write(log_path, lines)
    result = verify(log_path)
    assert result.broken_at == index + 1
    assert result.reason.startswith(
        f"entry has seq {index + 2} but is line {index + 1}"
    )


def test_truncated_entry_reported(log_path: Path) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-20])
    result = verify(log_path)
    assert result.broken_at == ENTRIES
    assert result.reason == "entry is truncated (no newline)"


def test_partial_tail_recovered_on_open(log_path: Path) -> None:
    log_path.write_bytes(log_path.read_bytes() + b'{"seq":7,"ti')
    with AuditLog(log_path) as log:
        assert log.entries == ENTRIES + 1
    last = json.loads(_lines(log_path)[-1])
    assert last["event"] == "audit.recovered"
    assert last["details"]["partial_bytes"] == 12
    evidence = log_path.parent / last["details"]["evidence_file"]
    assert evidence.read_bytes() == b'{"seq":7,"ti'
    assert verify(log_path).ok


def test_broken_log_not_reopened(log_path: Path) -> None:
    lines = _lines(log_path)
    del lines[2]
    _write(log_path, lines)
    with pytest.raises(AuditLogError, match="is broken at entry 3: entry has seq 4"):
        AuditLog(log_path)


def test_second_writer_rejected(log_path: Path) -> None:
    with AuditLog(log_path), pytest.raises(AuditLogError, match="in use by another"):
        AuditLog(log_path)


@pytest.mark.parametrize(
    ("details", "message"),
    [
        ({"private_key": "abc"}, "'private_key' looks like a secret"),
        ({"mask_seed": 12}, "'mask_seed' looks like a secret"),
        ({"token": "t"}, "'token' looks like a secret"),
        ({"note": "-----BEGIN PRIVATE KEY-----"}, "contains PEM key material"),
        ({"values": np.zeros(3)}, "has type ndarray"),
        ({"patient": {"age": 61}}, "has type dict"),
        ({"score": float("nan")}, "is not finite"),
        ({"Bad Name": 1}, "invalid audit detail name 'Bad Name'"),
    ],
)
def test_secret_details_rejected(tmp_path: Path, details: dict, message: str) -> None:
    with AuditLog(tmp_path / "audit.jsonl") as log:
        with pytest.raises(AuditLogError, match=message):
            log.append("update.rejected", "alpha", details)
        assert log.entries == 0
    assert (tmp_path / "audit.jsonl").read_bytes() == b""


def test_unknown_event_rejected(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with log, pytest.raises(AuditLogError, match=r"unknown audit event 'site\.hacked'"):
        log.append("site.hacked", "alpha")


def test_concurrent_appends_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:

        def append_many(site: str) -> None:
            for round_number in range(50):
                log.append("update.accepted", site, {"round": round_number})

        threads = [
            threading.Thread(target=append_many, args=(f"site{i}",)) for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result = verify(path)
    assert result.ok
    assert result.entries == 400


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer(Ed25519PrivateKey.generate())


def test_signed_head_verifies(log_path: Path, signer: Ed25519Signer) -> None:
    with AuditLog(log_path) as log:
        signed = log.sign_head(signer)
        log.append("round.opened", "coordinator", {"round": 2})
    assert signed["seq"] == ENTRIES
    assert signed["key_id"] == signer.key_id
    result = verify(log_path, signed_head=signed, public_key=signer.public_key)
    assert result.ok


def test_signed_head_detects_truncation(log_path: Path, signer: Ed25519Signer) -> None:
    with AuditLog(log_path) as log:
        signed = log.sign_head(signer)
    _write(log_path, _lines(log_path)[:-1])
    assert verify(log_path).ok
    result = verify(log_path, signed_head=signed, public_key=signer.public_key)
    assert not result.ok
    assert result.broken_at == ENTRIES
    assert result.reason == (
        f"log ends at entry {ENTRIES - 1} but the signed head is at entry "
        f"{ENTRIES}: entries were removed from the end"
    )


def test_signed_head_detects_rewrite(log_path: Path, signer: Ed25519Signer) -> None:
    with AuditLog(log_path) as log:
        signed = log.sign_head(signer)
    lines = _lines(log_path)
    lines[-1] = _rehash(lines[-1], actor="mallory")
    _write(log_path, lines)
    assert verify(log_path).ok
    result = verify(log_path, signed_head=signed, public_key=signer.public_key)
    assert result.broken_at == ENTRIES
    assert "does not match the signed head: the log was rewritten" in result.reason


def test_signed_head_wrong_key(log_path: Path, signer: Ed25519Signer) -> None:
    with AuditLog(log_path) as log:
        signed = log.sign_head(signer)
    other = Ed25519PrivateKey.generate().public_key()
    result = verify(log_path, signed_head=signed, public_key=other)
    assert not result.ok
    assert result.reason == "signed head does not verify"


def test_cli_verify_ok(log_path: Path, signer: Ed25519Signer, tmp_path: Path) -> None:
    with AuditLog(log_path) as log:
        head = log.sign_head(signer)
    (tmp_path / "head.json").write_text(json.dumps(head))
    (tmp_path / "audit.pub").write_text(public_key_to_base64(signer.public_key))
    options = ["--signed-head", str(tmp_path / "head.json")]
    options += ["--public-key", str(tmp_path / "audit.pub")]
    result = CliRunner().invoke(audit_app, ["verify", str(log_path), *options])
    assert result.exit_code == 0, result.output
    assert f"{ENTRIES} entries" in result.output
    assert result.output.strip().endswith(", ok")


def test_cli_verify_broken(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[3], lines[4] = lines[4], lines[3]
    _write(log_path, lines)
    result = CliRunner().invoke(audit_app, ["verify", str(log_path)])
    assert result.exit_code == AuditLogError.exit_code
    assert (
        f"audit log {log_path} is broken at entry 4: entry has seq 5" in result.output
    )


def test_cli_verify_key_without_head(log_path: Path, tmp_path: Path) -> None:
    (tmp_path / "audit.pub").write_text("unused")
    options = ["--public-key", str(tmp_path / "audit.pub")]

    result = CliRunner().invoke(audit_app, ["verify", str(log_path), *options])

    assert result.exit_code == AuditLogError.exit_code
    assert "--public-key requires --signed-head" in result.output
    assert "ok" not in result.output.split()
