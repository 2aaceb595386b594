"""Local mode: the aggregation service as a process on 127.0.0.1."""

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from medfed.errors import ServiceError

__all__ = ["LocalAggregationService"]

logger = logging.getLogger(__name__)


class LocalAggregationService:
    """Runs ``python -m medfed.aggregation`` on a free loopback port.

    Use as a context manager; the process is stopped on exit.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        max_upload_bytes: int,
        max_concurrency: int = 256,
        startup_timeout: float = 60.0,
    ) -> None:
        self.state_dir = state_dir
        self.max_upload_bytes = max_upload_bytes
        self.max_concurrency = max_concurrency
        self.startup_timeout = startup_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = (self.state_dir / "service.log").open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "medfed.aggregation",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--state-dir", str(self.state_dir),
                "--max-upload-bytes", str(self.max_upload_bytes),
                "--max-concurrency", str(self.max_concurrency),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log_path = self.state_dir / "service.log"
                raise ServiceError(
                    f"aggregation service exited with status {self.process.returncode} at start "
                    f"({_last_line(log_path)}); see {log_path}"
                )
            try:
                if (
                    httpx.get(
                        f"{self.url}/health", timeout=1.0, trust_env=False
                    ).status_code
                    == 200
                ):
                    logger.info("aggregation service listening on %s", self.url)
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise ServiceError(
            f"aggregation service did not start within {self.startup_timeout} s"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> "LocalAggregationService":
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _last_line(log: Path) -> str:
    """Return the last non-empty line of ``log``, which names why the service stopped."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "no log written"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return last[-300:] or "empty log"
