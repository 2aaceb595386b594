"""Run the heart-disease study through the real flow with each strategy.

Each strategy config of ``benchmarks/strategies.py`` that a study can run
(all but SCAFFOLD, whose site side is not wired yet) replaces the strategy of
``configs/heart_disease_nodp.yaml`` and of ``configs/heart_disease.yaml``
(site DP-SGD at epsilon 1). Each study runs through ``run_study``: Prefect's
ephemeral API, the aggregation service on 127.0.0.1, sites as local tasks and
MLflow on SQLite in a temporary folder. One run per config, with the
configs' own seed and preprocessing. Writes
``benchmarks/results/strategies_flow.json`` and rewrites the docs page of
``benchmarks/strategies.py`` with a section for these runs.

Usage: ``python benchmarks/strategies_flow.py [--configs fedavg fedadam]``
"""

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import strategies as offline
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "strategies_flow.json"
STUDIES = {"none": "heart_disease_nodp.yaml", "site DP-SGD": "heart_disease.yaml"}


def run_one(config_name: str, dp: str, folder: Path) -> dict[str, Any]:
    """Run one study through the flow and return its accuracies."""
    from medfed.contract.config import parse_study_config
    from medfed.flows.training import run_study

    strategy, params, wrappers = offline.CONFIGS[config_name]
    raw: dict[str, Any] = yaml.safe_load((REPO / "configs" / STUDIES[dp]).read_text())
    raw["study"] = f"bench-{config_name.replace('+', '-').replace('_', '-')}"
    raw["strategy"] = {
        "name": strategy,
        "params": params,
        "wrappers": [{"name": name, "params": p} for name, p in wrappers],
    }
    config = parse_study_config(raw)
    started = time.monotonic()
    summary = run_study(config, yaml.safe_dump(raw), work_dir=folder)
    return {
        "config": config_name,
        "dp": dp,
        "study_config": STUDIES[dp],
        "pooled": summary["pooled_test_accuracy"],
        "per_site": {
            site: values["test_accuracy"] for site, values in summary["sites"].items()
        },
        "site_epsilon": max(
            (values.get("epsilon_spent") or 0.0) for values in summary["sites"].values()
        ),
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    runnable = [name for name in offline.CONFIGS if name != "scaffold"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=runnable)
    arguments = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)

    from medfed.cli import configure_environment

    configure_environment()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        for index, config_name in enumerate(arguments.configs):
            for dp in STUDIES:
                work = Path(folder) / f"study-{index}-{len(rows)}"
                rows.append(run_one(config_name, dp, work))
                print(
                    f"{config_name:22s} {dp:12s} pooled {rows[-1]['pooled']:.3f} "
                    f"({rows[-1]['wall_seconds']} s)",
                    flush=True,
                )
    RESULTS.write_text(
        json.dumps({"benchmark": "strategies_flow", "rows": rows}, indent=2)
    )
    offline.write_docs(json.loads(offline.RESULTS.read_text()))


if __name__ == "__main__":
    main()
