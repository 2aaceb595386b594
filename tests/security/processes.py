"""Run the aggregation service as a separate process, as a deployment would."""

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from medfed.contract.kits import KitFiles


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServiceProcess:
    """``python -m medfed.aggregation`` with mutual TLS on a loopback port."""

    def __init__(self, state_dir: Path, kit_dir: Path, *extra: str) -> None:
        self.state_dir = state_dir
        self.kit_dir = kit_dir
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "service.log"

    def start(
        self, timeout: float = 60, environment: dict[str, str] | None = None
    ) -> "ServiceProcess":
        """Start the service, with ``environment`` added to this process's."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "medfed.aggregation",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            "--kit-dir",
            str(self.kit_dir),
            *self.extra,
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(environment or {})},
            )
        context = ssl.create_default_context(
            cafile=str(self.kit_dir / KitFiles.CA_CERT)
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"service exited with {self.process.returncode}: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            try:
                if httpx.get(
                    f"{self.url}/health", verify=context, timeout=2
                ).is_success:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"service did not answer /health within {timeout} s")

    def kill(self) -> None:
        """Kill the process with SIGKILL: no shutdown handler runs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def wait_for_exit(self, timeout: float = 30) -> int:
        """Wait for the process to end by itself; return its exit status."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def peak_rss_bytes(self) -> int:
        """Return the process's peak resident set size (VmHWM) in bytes."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found in /proc status")
