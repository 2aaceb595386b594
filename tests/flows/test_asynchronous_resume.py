"""Resuming an asynchronous study that was stopped in the middle.

Each test starts ``medfed run`` as a subprocess on a DP heart-disease study
with ``round.asynchronous``, stops it once the service has published a few
versions, and then runs ``medfed run --resume`` on the same work folder. One
test kills the command with SIGKILL, so its watchdog stops the services. The
other kills only the local aggregation service, a child process of the
command. The resumed run must publish every version once and keep every
accepted arrival, counted once. Each site's privacy ledger must continue the
one from before the stop. MLflow must have one registered model version, and
the audit chain must verify.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from medfed.sites.privacy import PrivacyLedger
from tests.conftest import CONFIGS
from tests.test_cli_processes import children, process_stat, still_running

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path("/proc/self/environ").exists(), reason="reads processes from /proc"
    ),
]

STUDY = "async-resume"
SITES = ("cleveland", "hungary", "switzerland", "long-beach")
#: Versions the study publishes; enough that it is still running at the stop.
VERSIONS = 16
BUFFER_SIZE = 2
#: The stop comes once the service has published this many versions.
STOP_AFTER = 3


def write_config(tmp_path: Path, data_root: Path) -> Path:
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    raw["study"] = STUDY
    raw["data"]["root"] = str(data_root)
    raw["training"]["rounds"] = VERSIONS
    raw["training"]["local_epochs"] = 1
    raw["round"] = {
        "deadline_seconds": 120,
        "asynchronous": {"buffer_size": BUFFER_SIZE},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def medfed_command(config: Path, work_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "medfed",
        "run",
        str(config),
        "--work-dir",
        str(work_dir),
        *extra,
    ]


def environment() -> dict[str, str]:
    # The command writes to mlflow.db in its working folder, not to the
    # store that fixtures of this process may have set.
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def audit_entries(work_dir: Path) -> list[dict[str, Any]]:
    log = work_dir / "aggregation" / "audit.jsonl"
    if not log.exists():
        return []
    entries = []
    for line in log.read_text().splitlines():
        # The service may be in the middle of appending the last line.
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return entries


def published_in_audit(work_dir: Path) -> list[int]:
    return [
        int(entry["details"]["version"])
        for entry in audit_entries(work_dir)
        if entry["event"] == "model.registered"
        and entry["details"].get("study") == STUDY
        and int(entry["details"]["version"]) > 0
    ]


def wait_for_published(
    process: subprocess.Popen[bytes], work_dir: Path, stderr: Path
) -> None:
    deadline = time.monotonic() + 400
    while len(published_in_audit(work_dir)) < STOP_AFTER:
        assert process.poll() is None, stderr.read_text()[-3000:]
        assert time.monotonic() < deadline, "the study published too few versions"
        time.sleep(0.05)


def start_study(config: Path, work_dir: Path, stderr: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        medfed_command(config, work_dir),
        cwd=config.parent,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("wb"),
    )


def service_processes(parent: int) -> dict[int, int]:
    """Return the start time of each service process that ``parent`` started."""
    services = {}
    for pid, command in children(parent).items():
        if "medfed.aggregation" in command or "prefect.server" in command:
            stat = process_stat(pid)
            if stat is not None:
                services[pid] = stat[2]
    return services


def wait_until_stopped(services: dict[int, int]) -> None:
    deadline = time.monotonic() + 30
    while still_running(services) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert still_running(services) == []


def stored_state(
    work_dir: Path,
) -> tuple[list[tuple[int, str]], list[tuple[Any, ...]]]:
    """Return the study's model versions with their SHA-256, and its arrivals."""
    database = work_dir / "aggregation" / "aggregation.sqlite3"
    with sqlite3.connect(database) as connection:
        versions = connection.execute(
            "SELECT version, sha256 FROM models WHERE study = ? ORDER BY version",
            (STUDY,),
        ).fetchall()
        arrivals = connection.execute(
            "SELECT site, base_version, sha256, aggregated_version FROM arrivals "
            "WHERE study = ? ORDER BY received_at, rowid",
            (STUDY,),
        ).fetchall()
    connection.close()
    return versions, arrivals


def ledgers(work_dir: Path) -> dict[str, PrivacyLedger]:
    return {
        site: PrivacyLedger.load(
            work_dir / "sites" / site / "studies" / STUDY / "privacy-ledger.json"
        )
        for site in SITES
    }


def resume(config: Path, work_dir: Path) -> dict[str, Any]:
    summary_path = config.parent / "summary.json"
    result = subprocess.run(
        medfed_command(
            config, work_dir, "--resume", "--summary-json", str(summary_path)
        ),
        cwd=config.parent,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


def check_resumed_study(
    config: Path,
    work_dir: Path,
    summary: dict[str, Any],
    before: tuple[list[tuple[int, str]], list[tuple[Any, ...]]],
    ledgers_before: dict[str, PrivacyLedger],
    run_id: str,
) -> None:
    versions_before, arrivals_before = before
    versions, arrivals = stored_state(work_dir)

    # Every version was published once, continuing from the last one.
    assert summary["rounds"] == VERSIONS
    assert summary["asynchronous"]["versions"] == VERSIONS
    assert [version for version, _ in versions] == list(range(VERSIONS + 1))
    assert versions[: len(versions_before)] == versions_before
    assert sorted(published_in_audit(work_dir)) == list(range(1, VERSIONS + 1))
    initial = [
        entry["details"]["duplicate"]
        for entry in audit_entries(work_dir)
        if entry["event"] == "model.registered"
        and entry["details"]["study"] == STUDY
        and entry["details"]["version"] == 0
    ]
    assert initial == [False, True]

    # Every arrival accepted before the stop is kept, and each counts once.
    stored = {(site, base, sha256) for site, base, sha256, _ in arrivals}
    assert {(site, base, sha256) for site, base, sha256, _ in arrivals_before} <= stored
    aggregated_before = {row for row in arrivals_before if row[3] is not None}
    assert aggregated_before <= set(arrivals)
    aggregated = Counter(row[3] for row in arrivals if row[3] is not None)
    assert aggregated == dict.fromkeys(range(1, VERSIONS + 1), BUFFER_SIZE)
    accepted = [
        (entry["actor"], entry["details"]["base_version"])
        for entry in audit_entries(work_dir)
        if entry["event"] == "update.accepted"
        and entry["details"]["study"] == STUDY
        and not entry["details"]["duplicate"]
    ]
    assert sorted(accepted) == sorted((site, base) for site, base, _, _ in arrivals)
    updates = Counter(row[0] for row in arrivals)
    spent = Counter(
        entry["actor"]
        for entry in audit_entries(work_dir)
        if entry["event"] == "privacy.spent" and entry["details"]["study"] == STUDY
    )
    for site in SITES:
        assert summary["sites"][site]["updates"] == updates[site], site
        # Each accepted update's privacy spend is in the audit log.
        assert spent[site] >= updates[site], site

    # Each site's ledger continues the one from before the stop, covers every
    # update the service accepted from it, and stays within the budget.
    for site, ledger in ledgers(work_dir).items():
        earlier = ledgers_before[site]
        spent_before = len(earlier.rounds_spent)
        assert ledger.rounds_spent[:spent_before] == earlier.rounds_spent, site
        assert ledger.steps_spent == ledger.steps_per_round * len(
            ledger.rounds_spent
        ), site
        assert len(ledger.rounds_spent) >= updates[site], site
        assert ledger.epsilon_spent() >= earlier.epsilon_spent(), site
        assert ledger.epsilon_spent() <= ledger.epsilon_budget, site
        reported = summary["sites"][site]["epsilon_spent"]
        assert reported == pytest.approx(ledger.epsilon_spent()), site

    # One MLflow run contains the study, records the resume and has one model.
    client = MlflowClient(tracking_uri=f"sqlite:///{config.parent / 'mlflow.db'}")
    registered = client.search_model_versions(f"name = '{STUDY}'")
    assert [str(version.version) for version in registered] == [
        summary["registered_model_version"]
    ]
    assert summary["mlflow_run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["medfed.event.resume1"] == (
        f"resumed at version {versions_before[-1][0]} of {VERSIONS}"
    )
    history = client.get_metric_history(run_id, "asynchronous.version_seconds")
    assert sorted(metric.step for metric in history) == list(
        range(versions_before[-1][0] + 1, VERSIONS + 1)
    )

    verified = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfed",
            "audit",
            "verify",
            str(work_dir / "aggregation" / "audit.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_killed_run_resumes(tmp_path: Path, data_root: Path) -> None:
    config = write_config(tmp_path, data_root)
    work_dir = tmp_path / "run"
    stderr = tmp_path / "stderr.txt"
    process = start_study(config, work_dir, stderr)
    services: dict[int, int] = {}
    try:
        wait_for_published(process, work_dir, stderr)
        services = service_processes(process.pid)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        wait_until_stopped(services)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in still_running(services):
            os.kill(pid, signal.SIGKILL)

    before = stored_state(work_dir)
    assert STOP_AFTER <= before[0][-1][0] < VERSIONS
    ledgers_before = ledgers(work_dir)
    run_id = json.loads((work_dir / "coordinator.json").read_text())["mlflow_run_id"]

    summary = resume(config, work_dir)

    check_resumed_study(config, work_dir, summary, before, ledgers_before, run_id)


def test_killed_service_stops_run(tmp_path: Path, data_root: Path) -> None:
    config = write_config(tmp_path, data_root)
    work_dir = tmp_path / "run"
    stderr = tmp_path / "stderr.txt"
    process = start_study(config, work_dir, stderr)
    services: dict[int, int] = {}
    try:
        wait_for_published(process, work_dir, stderr)
        services = service_processes(process.pid)
        aggregation = [
            pid
            for pid, command in children(process.pid).items()
            if "medfed.aggregation" in command
        ]
        assert len(aggregation) == 1
        os.kill(aggregation[0], signal.SIGKILL)
        exit_code = process.wait(timeout=300)
        wait_until_stopped(services)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in still_running(services):
            os.kill(pid, signal.SIGKILL)

    # The command exits with the aggregation-service exit code and prints how
    # to continue.
    message = stderr.read_text()
    assert exit_code == 6, message[-3000:]
    assert f"--resume --work-dir {work_dir}" in message
    before = stored_state(work_dir)
    assert STOP_AFTER <= before[0][-1][0] < VERSIONS
    ledgers_before = ledgers(work_dir)
    run_id = json.loads((work_dir / "coordinator.json").read_text())["mlflow_run_id"]

    summary = resume(config, work_dir)

    check_resumed_study(config, work_dir, summary, before, ledgers_before, run_id)
