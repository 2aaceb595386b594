from pathlib import Path

from medfed.flows.local import _last_line


def test_last_line_names_cause(tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    log.write_text("starting\nAuditLogError: audit log is in use\n\n")

    assert _last_line(log) == "AuditLogError: audit log is in use"


def test_last_line_without_log(tmp_path: Path) -> None:
    assert _last_line(tmp_path / "missing.log") == "no log written"
