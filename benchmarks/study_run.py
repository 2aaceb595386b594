"""Run one study through ``medfed run`` for a benchmark and read its summary."""

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

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


def run_study_config(
    raw: dict[str, Any], work_dir: Path
) -> tuple[dict[str, Any], float]:
    """Write the config ``raw`` into ``work_dir`` and run it with ``run_study_cli``.

    The config goes to ``config.yaml``, the summary to ``summary.json`` and the
    study's state to ``state/``, all in ``work_dir``.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return run_study_cli(config_path, work_dir / "summary.json", work_dir / "state")
