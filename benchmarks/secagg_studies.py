"""Run whole studies with each secure-aggregation mode and compare their AUC.

Runs a study config (by default ``configs/pneumonia_nodp.yaml``) once with
``secure_aggregation`` set to none, to masking and to CKKS, each a real
``medfed run`` (Prefect flow, aggregation service on 127.0.0.1, MLflow).
Every run keeps the config's study name and seeds, so the runs draw the
same initial model and batches and differ only in the mode. Their MLflow
runs share the study's experiment. For each run it records the pooled test
AUC and accuracy, the bytes each site uploaded, the wall time, and the AUC
difference from the run without secure aggregation. Results go to
``benchmarks/results/secagg_studies.json``; the figures are discussed on
``docs/benchmarks-secagg.md``.

Run: ``python benchmarks/secagg_studies.py [--config PATH] [--modes none ckks]``
"""

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from study_run import run_study_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "secagg_studies.json"
#: Both modes clip each update value to +-clip before encoding. Pneumonia
#: deltas of one round rarely exceed 1.0 (docs/benchmarks-secagg.md).
MODES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "masking": {"mode": "masking", "clip": 1.0, "max_weight": 5000},
    "ckks": {"mode": "ckks", "clip": 1.0, "max_weight": 5000},
}
#: Largest AUC difference from the run without secure aggregation that counts
#: as the same accuracy.
TARGET_AUC_DIFFERENCE = 0.01


def run_one(config: Path, mode: str, work_root: Path) -> dict[str, Any]:
    """Run the study once with ``mode`` and return its figures."""
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    # The study name stays: sites derive their batch-sampling seeds from it,
    # so another name would change the batches as well as the mode.
    settings = MODES[mode]
    if settings is not None:
        raw["secure_aggregation"] = settings
    summary, wall = run_study_config(raw, work_root / f"{config.stem}-{mode}")
    sites = summary["sites"]
    return {
        "config": str(config.relative_to(ROOT))
        if config.is_relative_to(ROOT)
        else str(config),
        "secure_aggregation": settings,
        "rounds": summary["rounds"],
        "test_auc": summary["pooled_test_auc"],
        "test_accuracy": summary["pooled_test_accuracy"],
        "bytes_uploaded_per_site": {
            site: info["bytes_uploaded"] for site, info in sites.items()
        },
        "wall_seconds": wall,
    }


def compare(results: dict[str, dict[str, Any]]) -> None:
    """Add each mode's AUC difference from the run without secure aggregation."""
    for key, result in results.items():
        config, _, _ = key.rpartition("-")
        baseline = results.get(f"{config}-none")
        if baseline is None:
            continue
        difference = result["test_auc"] - baseline["test_auc"]
        result["auc_difference_vs_none"] = difference
        result["meets_target"] = abs(difference) <= TARGET_AUC_DIFFERENCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=ROOT / "configs" / "pneumonia_nodp.yaml"
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--work-root", type=Path, default=ROOT / ".medfed" / "bench-secagg-studies"
    )
    args = parser.parse_args()
    config = args.config.resolve()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for mode in args.modes:
        key = f"{config.stem}-{mode}"
        results[key] = run_one(config, mode, args.work_root)
        compare(results)
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(json.dumps({key: results[key]}, indent=2))


if __name__ == "__main__":
    main()
