"""ServiceSecurity: audit records with a signed head, from many threads at once."""

import json
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI

from medfed.aggregation.audit import verify
from medfed.aggregation.limits import KEEP_ALIVE_SECONDS, SHUTDOWN_GRACE_SECONDS
from medfed.aggregation.security import SecuritySettings, install_security
from medfed.contract.kits import KitFiles
from medfed.contract.signing import public_key_from_base64
from medfed.errors import ConfigError


def test_concurrent_records_keep_head_signed(kits, tmp_path) -> None:
    app = FastAPI()
    settings = SecuritySettings(
        audit_log=tmp_path / "audit.jsonl", kit_dir=kits["aggregation"]
    )
    security = install_security(app, settings)
    errors: list[BaseException] = []

    def record_many(site: str) -> None:
        try:
            for round_number in range(25):
                security.record("update.accepted", site, {"round": round_number})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=record_many, args=(f"s{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    security.close()

    assert errors == []
    head = json.loads((tmp_path / "audit.jsonl.head.json").read_text())
    public_key = public_key_from_base64(
        (kits["coordinator"] / KitFiles.AUDIT_PUBLIC_KEY).read_text().strip()
    )
    result = verify(tmp_path / "audit.jsonl", signed_head=head, public_key=public_key)
    assert result.ok
    assert result.entries == 1 + 8 * 25
    assert head["seq"] == result.entries
    assert head["head"] == result.head


def test_local_mode_has_no_verifier(tmp_path: Path) -> None:
    security = install_security(
        FastAPI(), SecuritySettings(audit_log=tmp_path / "a.jsonl")
    )
    try:
        assert security.verifier is None
        assert security.uvicorn_options() == {
            "limit_concurrency": 256,
            "timeout_graceful_shutdown": SHUTDOWN_GRACE_SECONDS,
            "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        }
        assert not (tmp_path / "a.jsonl.head.json").exists()
        first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
        assert first["event"] == "service.started"
        assert first["details"] == {"mode": "local", "registered_sites": []}
    finally:
        security.close()


def test_incomplete_kit_rejected(kits, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"is missing \['audit-signing\.key'\]"):
        SecuritySettings(audit_log=tmp_path / "a.jsonl", kit_dir=kits["site-alpha"])
