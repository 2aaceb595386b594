"""Run one study through ``medfed run`` for a benchmark and read its summary."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_study_cli(
    config_path: Path, summary_path: Path, work_dir: Path
) -> tuple[dict[str, Any], float]:
    """Run ``medfed run`` on ``config_path`` and return its summary and wall seconds.

    The study runs in a subprocess from the repository root, keeps its state
    in ``work_dir`` and writes its summary to ``summary_path``. A failed study
    raises ``subprocess.CalledProcessError``.
    """
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from medfed.cli import main; main()",
            "run",
            str(config_path),
            "--summary-json",
            str(summary_path),
            "--work-dir",
            str(work_dir),
        ],
        cwd=ROOT,
        check=True,
    )
    wall = time.monotonic() - started
    return json.loads(summary_path.read_text(encoding="utf-8")), wall
