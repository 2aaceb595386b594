"""A watchdog that stops the processes started by ``medfed run`` after it dies.

A process killed by SIGKILL (or the kernel's out-of-memory killer) cannot
clean up, and its children keep running: the local aggregation service,
Prefect's ephemeral API server and any process those started.
``start_reaper`` marks the environment of this process with a random token,
which every process it starts later inherits, and starts this module as a
small child process. The watchdog waits until its own parent pid changes,
which means ``medfed run`` has exited for any reason. It then sends SIGTERM
to every process whose environment carries the token, and SIGKILL to those
still running after a grace period.

Linux only: on a system without ``/proc`` no watchdog starts. A process
started with an environment that leaves out the token is not found.
"""

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["TOKEN_ENV", "start_reaper"]

logger = logging.getLogger("medfed.reaper")

#: Environment variable that carries the token of one ``medfed run``.
TOKEN_ENV = "MEDFED_RUN_TOKEN"
_PROC = Path("/proc")
#: Seconds between checks that the parent is still alive.
POLL_SECONDS = 0.1
#: Seconds the marked processes get between SIGTERM and SIGKILL.
GRACE_SECONDS = 5.0


def start_reaper() -> subprocess.Popen[bytes] | None:
    """Mark this process's environment and start its watchdog.

    Returns the watchdog process, or None on a system without ``/proc``.
    Only processes started after this call carry the mark.
    """
    if not (_PROC / "self" / "environ").exists():
        logger.info(
            "no /proc on this system, so no watchdog stops the child processes "
            "if medfed run is killed"
        )
        return None
    token = secrets.token_hex(16)
    os.environ[TOKEN_ENV] = token
    return subprocess.Popen(
        [sys.executable, "-m", "medfed.reaper", str(os.getpid()), token],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )


def watch(parent: int, token: str) -> None:
    """Wait until ``parent`` exits, then stop the processes marked with ``token``."""
    # Ctrl-C in a terminal and a signal to the process group reach this
    # process too, and it has to outlive the parent to clean up after it.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    left = marked_processes(token, exclude=os.getpid())
    if not left:
        return
    logger.warning(
        "medfed run (pid %d) exited and left %d processes running; sending "
        "SIGTERM to pids %s",
        parent,
        len(left),
        ", ".join(map(str, left)),
    )
    _signal(left, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while left and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        left = marked_processes(token, exclude=os.getpid())
    if left:
        logger.warning(
            "pids %s still run %.0f s after SIGTERM; sending SIGKILL",
            ", ".join(map(str, left)),
            GRACE_SECONDS,
        )
        _signal(left, signal.SIGKILL)


def marked_processes(token: str, *, exclude: int) -> list[int]:
    """Return the running processes whose environment carries ``token``.

    Zombies (finished processes not yet reaped) and processes of other users,
    whose environment cannot be read, are left out.
    """
    mark = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        # The state follows the command name, which may contain spaces and
        # brackets, so it is found after the last closing bracket.
        state = stat[stat.rindex(b")") + 2 :].split()[0]
        if mark in environment and state != b"Z":
            found.append(int(entry.name))
    return sorted(found)


def _signal(pids: list[int], number: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    watch(int(sys.argv[1]), sys.argv[2])
