"""Time local-mode rounds on the heart-disease benchmark study.

Runs ``configs/heart_disease_bench.yaml`` (logistic regression, FedAvg, no DP,
100 rounds of 1 local epoch, batch 16, SGD learning rate 0.05) through the
real flow: Prefect's ephemeral API, the aggregation service on 127.0.0.1 and
an MLflow SQLite store in a temporary folder. Writes wall time and per-round
times to ``benchmarks/results/heart_round_time.json``.

Targets: median round <= 0.25 s, whole study <= 40 s.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=REPO / "configs" / "heart_disease_bench.yaml"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "benchmarks" / "results" / "heart_round_time.json",
    )
    arguments = parser.parse_args()

    from medfed.cli import configure_environment

    configure_environment()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        from medfed.contract.config import load_study_config
        from medfed.flows.training import run_study

        config = load_study_config(arguments.config)
        load_before = os.getloadavg()
        started = time.monotonic()
        summary = run_study(
            config, arguments.config.read_text(), work_dir=Path(folder) / "work"
        )
        process_wall = time.monotonic() - started
        load_after = os.getloadavg()

    rounds = summary["round_seconds"]
    result = {
        "config": str(arguments.config.relative_to(REPO)),
        "rounds": summary["rounds"],
        "study_wall_seconds": round(process_wall, 3),
        "flow_wall_seconds": round(summary["wall_seconds"], 3),
        "median_round_seconds": round(statistics.median(rounds), 4),
        "p90_round_seconds": round(sorted(rounds)[int(0.9 * len(rounds))], 4),
        "max_round_seconds": round(max(rounds), 4),
        "pooled_test_accuracy": round(summary["pooled_test_accuracy"], 4),
        "targets": {"median_round_seconds": 0.25, "study_wall_seconds": 40.0},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(value, 2) for value in load_before],
            "load_average_after": [round(value, 2) for value in load_after],
        },
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
