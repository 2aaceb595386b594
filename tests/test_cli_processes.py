"""Stopping ``medfed run``: the services it started stop with it, even after SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="reads processes from /proc"
)

#: Command-line fragments of the two services that ``medfed run`` starts.
SERVICES = ("medfed.aggregation", "prefect.server.api.server")


def start_study(tmp_path: Path) -> subprocess.Popen[bytes]:
    # Enough rounds that the study still runs when the test stops it.
    config = tmp_path / "study.yaml"
    config.write_text(
        (CONFIGS / "heart_disease_nodp.yaml")
        .read_text()
        .replace("rounds: 20", "rounds: 5000")
    )
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "-m", "medfed", "run", str(config)],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.txt").open("wb"),
    )


def process_stat(pid: int) -> tuple[str, int, int] | None:
    """Return the state, parent pid and start time of ``pid``, or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def children(parent: int) -> dict[int, str]:
    """Return the command line of each child of ``parent`` by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = process_stat(int(entry.name))
        if stat is None or stat[1] != parent:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        found[int(entry.name)] = command.decode(errors="replace")
    return found


def wait_for_services(
    process: subprocess.Popen[bytes], tmp_path: Path
) -> dict[int, int]:
    """Wait until both services run; return their start times by pid."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        running = children(process.pid)
        services = {
            pid: command
            for pid, command in running.items()
            if any(name in command for name in SERVICES)
        }
        if len(services) == len(SERVICES):
            start_times = {pid: process_stat(pid) for pid in services}
            return {pid: stat[2] for pid, stat in start_times.items() if stat}
        time.sleep(0.5)
    pytest.fail(f"services did not start within 240 s: {children(process.pid)}")


def still_running(services: dict[int, int]) -> list[int]:
    running = []
    for pid, start_time in services.items():
        stat = process_stat(pid)
        if stat is not None and stat[0] != "Z" and stat[2] == start_time:
            running.append(pid)
    return running


@pytest.mark.parametrize(
    ("number", "exit_code"),
    [
        (signal.SIGKILL, -signal.SIGKILL),
        (signal.SIGTERM, 128 + signal.SIGTERM),
        (signal.SIGINT, 128 + signal.SIGINT),
    ],
)
def test_services_stop_with_run(
    tmp_path: Path, number: signal.Signals, exit_code: int
) -> None:
    process = start_study(tmp_path)
    services: dict[int, int] = {}
    try:
        services = wait_for_services(process, tmp_path)
        # Signal once the study has begun, so there is a run to resume.
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".medfed/runs/*/coordinator.json")):
            assert time.monotonic() < deadline, "the study did not begin"
            time.sleep(0.2)

        process.send_signal(number)
        assert process.wait(timeout=60) == exit_code
        if number != signal.SIGKILL:
            stderr = (tmp_path / "stderr.txt").read_text()
            assert "--resume --work-dir .medfed/runs/" in stderr
        deadline = time.monotonic() + 15
        while still_running(services) and time.monotonic() < deadline:
            time.sleep(0.2)

        assert still_running(services) == [], (tmp_path / "stderr.txt").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in still_running(services):
            os.kill(pid, signal.SIGKILL)
