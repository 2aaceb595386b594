"""``medfed serve-aggregator`` as a process: what it logs."""

import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.security.processes import free_port


def test_serve_aggregator_logs_round_events(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "medfed.cli", "serve-aggregator",
                "--state-dir", str(tmp_path / "state"), "--port", str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "service did not answer /health"
            try:
                if httpx.get(f"{url}/health", timeout=1, trust_env=False).is_success:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        # The service rejects a study that does not exist and logs it at INFO.
        response = httpx.get(f"{url}/v1/studies/absent", timeout=5, trust_env=False)
    finally:
        process.terminate()
        process.wait(timeout=30)

    assert response.status_code == 404
    output = log_path.read_text()
    assert f"starting the aggregation service on http://127.0.0.1:{port}" in output
    assert "rejected GET /v1/studies/absent" in output
