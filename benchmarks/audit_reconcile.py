"""Time the audit reconciliation that runs when the aggregation service starts.

Builds a state folder with ``--uploads`` stored uploads in one study and an
audit log of ``--entries`` entries that lists all of them but the last
``--missing``. The other entries are ``model.downloaded`` lines. Entries
are written directly (hash chain, no fsync per line) to build the log
quickly. Then, in one process, it times:

1. opening the audit log, which verifies the whole chain (``AuditLog``);
2. the first reconciliation, with no checkpoint, which parses the whole
   log and appends the ``--missing`` entries (one fsync each);
3. the second reconciliation, after a reopen, which parses only the entries
   appended since the checkpoint.

Writes ``benchmarks/results/audit_reconcile.json``.
"""

import argparse
import hashlib
import json
import platform
import sqlite3
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfed.aggregation.audit import GENESIS_HASH, AuditEntry, entry_hash
from medfed.aggregation.audit_recovery import reconcile_audit
from medfed.aggregation.security import SecuritySettings, ServiceSecurity
from medfed.aggregation.store import Store

STUDY = "heart"


def build_state(state_dir: Path, uploads: int, entries: int, missing: int) -> None:
    store = Store(state_dir / "aggregation.sqlite3")
    store.close()
    rows = []
    for number in range(uploads):
        sha256 = hashlib.sha256(number.to_bytes(8, "big")).hexdigest()
        rows.append((STUDY, number // 10, f"site-{number % 10}", sha256, 10))
    with sqlite3.connect(state_dir / "aggregation.sqlite3") as connection:
        connection.executemany(
            "INSERT INTO uploads (study, round, site, sha256, nonce, sample_count,"
            " size, envelope, received_at) VALUES (?, ?, ?, ?, '', ?, 0, x'', 0)",
            rows,
        )
    logged = rows[: uploads - missing]
    previous = GENESIS_HASH
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    with (state_dir / "audit.jsonl").open("wb") as stream:
        for seq in range(1, entries + 1):
            if seq <= len(logged):
                study, round_number, site, sha256, samples = logged[seq - 1]
                event, actor = "update.accepted", site
                details: dict[str, Any] = {
                    "study": study,
                    "round": round_number,
                    "receipt": sha256[:32],
                    "sha256": sha256,
                    "sample_count": samples,
                }
            else:
                event, actor = "model.downloaded", "site-0"
                details = {"study": STUDY, "version": 0, "sha256": "0" * 64}
            fields = {
                "seq": seq,
                "time": now,
                "event": event,
                "actor": actor,
                "details": details,
                "prev_hash": previous,
            }
            digest = entry_hash(**fields)
            stream.write(AuditEntry(**fields, hash=digest).to_line())
            previous = digest


def start_and_reconcile(state_dir: Path) -> tuple[float, float, int]:
    """Return seconds to open the log, seconds to reconcile, and entries appended."""
    started = time.perf_counter()
    security = ServiceSecurity(SecuritySettings(audit_log=state_dir / "audit.jsonl"))
    opened = time.perf_counter()
    store = Store(state_dir / "aggregation.sqlite3")
    try:
        recovered = reconcile_audit(store, security)
    finally:
        store.close()
        security.close()
    return opened - started, time.perf_counter() - opened, len(recovered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uploads", type=int, default=50_000, help="stored uploads in the store"
    )
    parser.add_argument(
        "--entries", type=int, default=200_000, help="entries in the audit log"
    )
    parser.add_argument(
        "--missing",
        type=int,
        default=100,
        help="stored uploads that the log does not list",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("benchmarks/results/audit_reconcile.json"),
        help="JSON file for the results",
    )
    arguments = parser.parse_args()
    if not arguments.missing <= arguments.uploads <= arguments.entries:
        parser.error("expected missing <= uploads <= entries")

    with tempfile.TemporaryDirectory() as folder:
        state_dir = Path(folder)
        build_state(state_dir, arguments.uploads, arguments.entries, arguments.missing)
        log_bytes = (state_dir / "audit.jsonl").stat().st_size
        first_open, first_reconcile, first_added = start_and_reconcile(state_dir)
        second_open, second_reconcile, second_added = start_and_reconcile(state_dir)

    result = {
        "uploads": arguments.uploads,
        "entries": arguments.entries,
        "missing": arguments.missing,
        "log_bytes": log_bytes,
        "first_start": {
            "open_and_verify_seconds": round(first_open, 3),
            "reconcile_seconds": round(first_reconcile, 3),
            "entries_appended": first_added,
        },
        "second_start": {
            "open_and_verify_seconds": round(second_open, 3),
            "reconcile_seconds": round(second_reconcile, 3),
            "entries_appended": second_added,
        },
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
