"""Run the three PneumoniaMNIST studies and record test AUC, accuracy and wall time.

Runs, one after the other in local mode (``medfed run``), the centralized
baseline (``configs/pneumonia_central.yaml``), federated training without DP
(``configs/pneumonia_nodp.yaml``) and federated training with DP-SGD at
epsilon 8 per site (``configs/pneumonia.yaml``, ``scatter_gn``). The first
two train ``resnet_gn``; ``dp_resnet`` (``configs/pneumonia_dp_resnet.yaml``)
trains it with DP as well, so all three ways compare on one model. Each study's summary is kept
in ``benchmarks/results/pneumonia_<name>.json``; the figures that matter are
collected in ``benchmarks/results/pneumonia_studies.json``. The test metrics
are pooled over the sites' shares of the official test split, which together
are the whole split (624 images). After the studies it runs
``benchmarks/dp_step_time.py`` once per model (``resnet_gn`` and
``scatter_gn``) and records the DP step time over the non-private step time,
batch 64, both measured in that one run.

Run: ``python benchmarks/pneumonia_studies.py [--only central nodp dp dp_resnet
step] [--rounds N]``
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml
from study_run import run_study_cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STUDIES = {
    "central": "configs/pneumonia_central.yaml",
    "nodp": "configs/pneumonia_nodp.yaml",
    "dp": "configs/pneumonia.yaml",
    "dp_resnet": "configs/pneumonia_dp_resnet.yaml",
}
TARGETS = {
    "central": {"auc": 0.944, "accuracy": 0.854},
    "nodp": {"auc": 0.94},
    "dp": {"auc": 0.93, "accuracy": 0.85},
    "dp_resnet": {"auc": 0.93, "accuracy": 0.85},
}
#: The models whose DP step time the "step" entry measures, by results key.
STEP_MODELS = {"dp_step_time": "resnet_gn", "dp_step_time_scatter_gn": "scatter_gn"}
MAX_WALL_SECONDS = 20 * 60
#: The DP step may take at most this many times the non-private step.
MAX_DP_STEP_RATIO = 1.5


def run_study(
    name: str, work_root: Path, rounds: int | None = None
) -> dict[str, object]:
    summary_path = RESULTS / f"pneumonia_{name}.json"
    config_path = ROOT / STUDIES[name]
    if rounds is not None:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        raw["training"]["rounds"] = rounds
        work_root.mkdir(parents=True, exist_ok=True)
        config_path = work_root / f"{name}-{rounds}-rounds.yaml"
        config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")

    summary, wall = run_study_cli(config_path, summary_path, work_root / name)
    sites = summary["sites"]
    epsilons = [v.get("epsilon_spent") for v in sites.values()]
    auc = summary["pooled_test_auc"]
    accuracy = summary["pooled_test_accuracy"]
    targets = TARGETS[name]
    return {
        "config": STUDIES[name],
        "rounds_override": rounds,
        "rounds": summary["rounds"],
        "test_auc": auc,
        "test_accuracy": accuracy,
        "wall_seconds": wall,
        "max_epsilon_spent": max((e for e in epsilons if e is not None), default=None),
        "targets": targets,
        "meets_targets": (
            auc >= targets["auc"]
            and accuracy >= targets.get("accuracy", 0.0)
            and wall <= MAX_WALL_SECONDS
        ),
    }


def measure_step_time(model: str) -> dict[str, object]:
    """Run ``dp_step_time.py`` on ``model`` and return the fast DP path's ratio."""
    suffix = "" if model == "resnet_gn" else f"_{model}"
    output = RESULTS / f"dp_step_time{suffix}.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "dp_step_time.py"),
            "--model",
            model,
            "--repeats",
            "40",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        check=True,
    )
    measured = json.loads(output.read_text(encoding="utf-8"))
    ratios = measured["ratio_to_nonprivate"]
    return {
        "model": model,
        "result_file": str(output.relative_to(ROOT)),
        "load_average_1min": measured["load_average_1min"],
        "ratio_to_nonprivate": ratios,
        "target_ratio": MAX_DP_STEP_RATIO,
        "meets_target": ratios["fastdp"] <= MAX_DP_STEP_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*sorted(STUDIES), "step"],
        help="studies to run, and 'step' for the DP step time; default all",
    )
    parser.add_argument(
        "--rounds", type=int, help="override every study's training.rounds"
    )
    parser.add_argument(
        "--work-root",
        type=Path,
        default=ROOT / ".medfed" / "bench",
        help="folder for the studies' state",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    output = RESULTS / "pneumonia_studies.json"
    results = json.loads(output.read_text()) if output.exists() else {}
    for name in args.only or [*STUDIES, "step"]:
        if name == "step":
            for key, model in STEP_MODELS.items():
                results[key] = measure_step_time(model)
                output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
                print(json.dumps({key: results[key]}, indent=2))
            continue
        results[name] = run_study(name, args.work_root, args.rounds)
        output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(json.dumps({name: results[name]}, indent=2))


if __name__ == "__main__":
    main()
