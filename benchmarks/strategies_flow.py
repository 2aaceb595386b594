"""Run real studies through the flow with each aggregation strategy.

Heart disease (default): each strategy config of ``benchmarks/strategies.py``
replaces the strategy of ``configs/heart_disease_nodp.yaml`` and of
``configs/heart_disease.yaml`` (site DP-SGD at epsilon 1). Writes
``benchmarks/results/strategies_flow.json`` and rewrites the docs page of
``benchmarks/strategies.py`` with a section for these runs.

PneumoniaMNIST (``--pneumonia``): ``configs/pneumonia_nodp.yaml`` with
strategy fedavg, fedprox (mu 0.01) and scaffold, its five sites split by
Dirichlet label skew with alpha 0.1 (the config uses 0.5). Writes the pooled
and per-site test AUC and accuracy of each run to
``benchmarks/results/strategies_pneumonia.json`` (or ``--output``).
``--rounds`` and ``--widths`` shrink the study for a quick check of the
script. The JSON marks such runs with ``shrunk_for_a_check``, and they are
not comparable to full ones.

Each study runs through ``run_study``: Prefect's ephemeral API, the
aggregation service on 127.0.0.1, sites as local tasks and MLflow on SQLite in
a temporary folder. One run per config, with the configs' own seed and
preprocessing.

Usage::

    python benchmarks/strategies_flow.py [--configs fedavg fedadam]
    python benchmarks/strategies_flow.py --pneumonia [--strategies fedavg scaffold]
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

PNEUMONIA_RESULTS = REPO / "benchmarks" / "results" / "strategies_pneumonia.json"
PNEUMONIA_CONFIG = "pneumonia_nodp.yaml"
PNEUMONIA_ALPHA = 0.1
#: Strategies of the pneumonia comparison; total_sites of scaffold comes from
#: the config's site list.
PNEUMONIA_STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "params": {"mu": 0.01}},
    "scaffold": {"name": "scaffold"},
}


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


def run_pneumonia(
    strategy_name: str,
    folder: Path,
    *,
    rounds: int | None,
    widths: list[int] | None,
) -> dict[str, Any]:
    """Run the pneumonia study with one strategy; return its test metrics."""
    from medfed.contract.config import parse_study_config
    from medfed.flows.training import run_study

    raw: dict[str, Any] = yaml.safe_load(
        (REPO / "configs" / PNEUMONIA_CONFIG).read_text()
    )
    raw["study"] = f"pneumonia-{strategy_name}"
    raw["strategy"] = PNEUMONIA_STRATEGIES[strategy_name]
    raw["data"]["partition"]["params"]["alpha"] = PNEUMONIA_ALPHA
    if rounds is not None:
        raw["training"]["rounds"] = rounds
    if widths is not None:
        raw["model"]["params"]["widths"] = widths
    config = parse_study_config(raw)
    started = time.monotonic()
    summary = run_study(config, yaml.safe_dump(raw), work_dir=folder)
    return {
        "strategy": strategy_name,
        "strategy_config": raw["strategy"],
        "rounds": summary["rounds"],
        "pooled_test_auc": summary["pooled_test_auc"],
        "pooled_test_accuracy": summary["pooled_test_accuracy"],
        "per_site": {
            site: {
                "test_auc": values["test_auc"],
                "test_accuracy": values["test_accuracy"],
                "test_records": values["test_records"],
                "train_records": values["train_records"],
            }
            for site, values in summary["sites"].items()
        },
        "wall_seconds": round(time.monotonic() - started, 1),
    }


def pneumonia_main(arguments: argparse.Namespace) -> None:
    """Run the pneumonia comparison and write its JSON."""
    shrunk = arguments.rounds is not None or arguments.widths is not None
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        for name in arguments.strategies:
            rows.append(
                run_pneumonia(
                    name,
                    Path(folder) / f"study-{name}",
                    rounds=arguments.rounds,
                    widths=arguments.widths,
                )
            )
            print(
                f"{name:10s} pooled test AUC {rows[-1]['pooled_test_auc']:.3f} "
                f"({rows[-1]['wall_seconds']} s)",
                flush=True,
            )
    output = arguments.output or PNEUMONIA_RESULTS
    output.write_text(
        json.dumps(
            {
                "benchmark": "strategies_pneumonia",
                "study_config": f"configs/{PNEUMONIA_CONFIG}",
                "partition": {"name": "label_skew", "alpha": PNEUMONIA_ALPHA},
                "shrunk_for_a_check": shrunk,
                "rounds_override": arguments.rounds,
                "widths_override": arguments.widths,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="*",
        default=list(offline.CONFIGS),
        help="heart-disease strategy configs of benchmarks/strategies.py to run",
    )
    parser.add_argument(
        "--pneumonia",
        action="store_true",
        help="run the PneumoniaMNIST comparison instead of heart disease",
    )
    parser.add_argument(
        "--strategies",
        nargs="*",
        choices=sorted(PNEUMONIA_STRATEGIES),
        default=list(PNEUMONIA_STRATEGIES),
        help="with --pneumonia: the strategies to run",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="with --pneumonia: rounds per study (default: the config's)",
    )
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=None,
        help="with --pneumonia: ResNet channel widths (default: the config's)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"with --pneumonia: JSON file to write (default: {PNEUMONIA_RESULTS})",
    )
    arguments = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)

    from medfed.cli import configure_environment

    configure_environment()
    if arguments.pneumonia:
        pneumonia_main(arguments)
        return
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
