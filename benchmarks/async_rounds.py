"""Compare synchronous and asynchronous studies with one slow hospital.

Runs ``configs/heart_disease_nodp.yaml`` (logistic regression, FedAvg, no DP,
5 local epochs) for ``--versions`` global versions through the real flow:
Prefect's ephemeral API, the aggregation service on 127.0.0.1 and an MLflow
SQLite store in a temporary folder. The site ``switzerland`` is made slow:
every local training there first sleeps ``--slow-seconds`` (the script
patches ``SiteRunner._training_settings``, which runs once per local
training). The same study runs synchronously, then asynchronously with each
``--buffer-sizes`` value, all in one process.

For each run the script records the seconds from the first round (or the
first site update) to the last version, the flow's wall time and the pooled
test accuracy of the final version. Asynchronous runs also record each site's
updates and their staleness. Writes ``benchmarks/results/async_rounds.json``.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SLOW_SITE = "switzerland"


def run_one(
    raw: dict[str, Any], work_dir: Path, buffer_size: int | None
) -> dict[str, Any]:
    from medfed.contract.config import parse_study_config
    from medfed.flows.training import run_study

    raw = json.loads(json.dumps(raw))
    mode = "synchronous" if buffer_size is None else f"asynchronous_k{buffer_size}"
    raw["study"] = f"async-bench-{mode.replace('_', '-')}"
    if buffer_size is not None:
        raw["round"]["asynchronous"] = {"buffer_size": buffer_size}
    config = parse_study_config(raw)
    started = time.monotonic()
    summary = run_study(config, yaml.safe_dump(raw), work_dir=work_dir / mode)
    process_wall = time.monotonic() - started
    if buffer_size is None:
        to_last_version = sum(summary["round_seconds"])
    else:
        to_last_version = summary["asynchronous"]["version_seconds"][-1]
    result: dict[str, Any] = {
        "mode": mode,
        "buffer_size": buffer_size,
        "versions": summary["model_version"],
        "seconds_to_last_version": round(to_last_version, 2),
        "flow_wall_seconds": round(summary["wall_seconds"], 2),
        "process_wall_seconds": round(process_wall, 2),
        "pooled_test_accuracy": round(summary["pooled_test_accuracy"], 4),
        "pooled_test_auc": round(summary["pooled_test_auc"], 4),
    }
    if buffer_size is not None:
        result["sites"] = {
            site: {
                "updates": entry["updates"],
                "aggregated_updates": entry["aggregated_updates"],
                "staleness": entry["staleness"],
            }
            for site, entry in summary["sites"].items()
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=REPO / "configs" / "heart_disease_nodp.yaml"
    )
    parser.add_argument("--versions", type=int, default=30)
    parser.add_argument(
        "--slow-seconds",
        type=float,
        default=2.0,
        help="seconds the slow site sleeps before each local training",
    )
    parser.add_argument("--buffer-sizes", type=int, nargs="+", default=[2, 3])
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "benchmarks" / "results" / "async_rounds.json",
    )
    arguments = parser.parse_args()

    from medfed.cli import configure_environment

    configure_environment()
    from medfed.sites.runner import SiteRunner

    original = SiteRunner._training_settings

    def slow_settings(self: SiteRunner, *args: Any, **kwargs: Any) -> Any:
        if self.site_id == SLOW_SITE:
            time.sleep(arguments.slow_seconds)
        return original(self, *args, **kwargs)

    SiteRunner._training_settings = slow_settings  # type: ignore[method-assign]

    raw: dict[str, Any] = yaml.safe_load(arguments.config.read_text())
    raw["training"]["rounds"] = arguments.versions
    raw["round"] = {"deadline_seconds": 300}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        runs = [run_one(raw, Path(folder), None)]
        for buffer_size in arguments.buffer_sizes:
            runs.append(run_one(raw, Path(folder), buffer_size))
    load_after = os.getloadavg()

    result = {
        "config": str(arguments.config.relative_to(REPO)),
        "versions": arguments.versions,
        "slow_site": SLOW_SITE,
        "slow_seconds_per_training": arguments.slow_seconds,
        "runs": runs,
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
