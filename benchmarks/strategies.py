"""Compare aggregation strategies on the UCI heart-disease hospitals.

Four sites, one per hospital file (Cleveland, Hungary, Switzerland, Long
Beach VA), each with a seeded 66/34 train/test split. Every strategy trains
the registered ``logistic_regression`` model with the site-side helpers it
needs (FedProx's proximal step, SCAFFOLD's control variates), once without
DP and once with DP-SGD at each site (Opacus, epsilon 1 at delta 1e-5 over
the whole study). Central DP is an extra row: it protects whole sites at
the server instead. The script records pooled and per-site test accuracy
(mean and standard deviation over seeds) to
``benchmarks/results/strategies.json`` and ``docs/benchmarks-strategies.md``.

This runs the strategies in one process: the sites' local training and the
server's aggregation call the same medfed code as a study, but without the
Prefect flow, the HTTP aggregation service or the update envelope.

Usage: ``python benchmarks/strategies.py [--seeds 5] [--rounds 20]``
"""

import argparse
import json
import logging
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from medfed.aggregation.compatibility import build_strategy
from medfed.aggregation.strategies import SiteUpdate, Strategy
from medfed.contract.models import build_model
from medfed.sites.regularizers import apply_proximal_step, proximal_penalty
from medfed.sites.scaffold import ScaffoldSite

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path("/work/shared/data/heart-disease")
if not DATA_DIR.is_dir():
    DATA_DIR = ROOT.parent / "shared" / "data" / "heart-disease"
RESULTS = ROOT / "benchmarks" / "results" / "strategies.json"
DOCS = ROOT / "docs" / "benchmarks-strategies.md"

HOSPITALS = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
# The 13 clinical columns (age to thal). Slope, ca and thal are mostly
# missing outside Cleveland and get the pooled mean there.
FEATURE_COLUMNS = list(range(13))
LABEL_COLUMN = 13

TARGET_DELTA = 1e-5
DP_EPSILON = 1.0
MAX_GRAD_NORM = 1.0
BATCH_SIZE = 16
LOCAL_EPOCHS = 1
LEARNING_RATE = 0.1

# Strategy configs: name -> (strategy, params, wrappers). Server learning rates
# of the adaptive optimizers were picked by a small sweep on seed 100, which
# is not among the reported seeds.
CONFIGS: dict[str, tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]] = {
    "fedavg": ("fedavg", {}, []),
    "fedavgm": ("fedavgm", {"momentum": 0.5}, []),
    "fedadam": ("fedadam", {"server_learning_rate": 0.05, "tau": 1e-2}, []),
    "fedyogi": ("fedyogi", {"server_learning_rate": 0.05, "tau": 1e-2}, []),
    "fedadagrad": ("fedadagrad", {"server_learning_rate": 0.3, "tau": 1e-2}, []),
    "fedprox": ("fedprox", {"mu": 0.1}, []),
    "scaffold": ("scaffold", {"total_sites": 4}, []),
    "fedavg+norm_bound": ("fedavg", {}, [("norm_bound", {"max_norm": 1.0})]),
    "fedavg+median": ("fedavg", {}, [("median", {})]),
    "fedavg+trimmed_mean": ("fedavg", {}, [("trimmed_mean", {"beta": 0.25})]),
    "fedavg+krum": ("fedavg", {}, [("krum", {"f": 0})]),
}


@dataclass
class Site:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [
        [np.nan if field == "?" else float(field) for field in line.split(",")]
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    table = np.asarray(rows, np.float64)
    return table[:, FEATURE_COLUMNS], (table[:, LABEL_COLUMN] > 0).astype(np.float32)


def load_sites(seed: int) -> list[Site]:
    """Split each hospital 66/34 and standardize with federated statistics.

    The mean and standard deviation of each column come from the sites'
    per-column sums, sums of squares and counts over their training records,
    the aggregates a federated statistics round reveals, never a record. A
    missing value gets the pooled mean, which standardizes to 0.
    """
    rng = np.random.default_rng(seed)
    splits = []
    for name, file_name in HOSPITALS.items():
        features, labels = _read(DATA_DIR / file_name)
        order = rng.permutation(len(labels))
        cut = round(0.66 * len(labels))
        splits.append((name, features, labels, order[:cut], order[cut:]))
    sums = sum(np.nansum(f[train], axis=0) for _, f, _, train, _ in splits)
    squares = sum(np.nansum(f[train] ** 2, axis=0) for _, f, _, train, _ in splits)
    counts = sum(np.sum(~np.isnan(f[train]), axis=0) for _, f, _, train, _ in splits)
    mean = sums / counts
    std = np.sqrt(np.maximum(squares / counts - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)
    sites = []
    for name, features, labels, train, test in splits:
        standardized = (np.where(np.isnan(features), mean, features) - mean) / std
        standardized = standardized.astype(np.float32)
        sites.append(
            Site(
                name,
                torch.from_numpy(standardized[train]),
                torch.from_numpy(labels[train]),
                torch.from_numpy(standardized[test]),
                torch.from_numpy(labels[test]),
            )
        )
    return sites


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        key: value.detach().cpu().numpy().copy()
        for key, value in model.state_dict().items()
    }


def _load(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    model.load_state_dict(
        {key: torch.from_numpy(value) for key, value in weights.items()}
    )


class SiteTrainer:
    """One hospital's local training across rounds, with or without DP-SGD."""

    def __init__(
        self,
        site: Site,
        *,
        dp: bool,
        rounds: int,
        state_dir: Path,
        seed: int,
    ) -> None:
        self.site = site
        self.dp = dp
        self.state_dir = state_dir
        self.generator = torch.Generator().manual_seed(seed)
        self.engine = PrivacyEngine(accountant="rdp") if dp else None
        sample_rate = BATCH_SIZE / len(site.train_y)
        self.noise_multiplier = (
            get_noise_multiplier(
                target_epsilon=DP_EPSILON,
                target_delta=TARGET_DELTA,
                sample_rate=sample_rate,
                epochs=rounds * LOCAL_EPOCHS,
            )
            if dp
            else 0.0
        )

    def epsilon(self) -> float:
        return (
            0.0 if self.engine is None else float(self.engine.get_epsilon(TARGET_DELTA))
        )

    def train(
        self,
        global_weights: dict[str, np.ndarray],
        strategy: Strategy,
        published: dict[str, dict[str, np.ndarray]],
    ) -> SiteUpdate:
        model = build_model("logistic_regression", in_features=len(FEATURE_COLUMNS))
        _load(model, global_weights)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        dataset = torch.utils.data.TensorDataset(self.site.train_x, self.site.train_y)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=BATCH_SIZE, shuffle=True, generator=self.generator
        )

        trained: nn.Module = model
        if self.engine is not None:
            trained, optimizer, loader = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=MAX_GRAD_NORM,
            )

        mu = strategy.site_settings().get("proximal_mu")
        scaffold = None
        if "control_variate" in published:
            scaffold = ScaffoldSite.load(
                self.state_dir / f"{self.site.name}-scaffold.safetensors",
                global_weights,
                published.get("control_variate"),
            )
        steps = self._run_epochs(
            trained, optimizer, loader, global_weights, mu, scaffold
        )

        local = _state(model)
        delta = {key: local[key] - global_weights[key] for key in local}
        extras: dict[str, dict[str, np.ndarray]] = {}
        if scaffold is not None:
            new_control, control_delta = scaffold.control_update(
                local, local_steps=max(steps, 1), learning_rate=LEARNING_RATE
            )
            scaffold.commit(new_control)
            extras["control_delta"] = control_delta
        return SiteUpdate(self.site.name, delta, len(self.site.train_y), extras)

    def _run_epochs(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: torch.utils.data.DataLoader,
        global_weights: dict[str, np.ndarray],
        mu: float | None,
        scaffold: ScaffoldSite | None,
    ) -> int:
        steps = 0
        criterion = nn.BCEWithLogitsLoss()
        for _ in range(LOCAL_EPOCHS):
            for features, labels in loader:
                if len(labels) == 0:
                    continue
                optimizer.zero_grad()
                loss = criterion(model(features), labels)
                if mu and not self.dp:
                    loss = loss + proximal_penalty(model, global_weights, mu=mu)
                loss.backward()
                if scaffold is not None and not self.dp:
                    scaffold.correct_gradients(model)
                optimizer.step()
                if mu and self.dp:
                    apply_proximal_step(
                        model, global_weights, mu=mu, learning_rate=LEARNING_RATE
                    )
                if scaffold is not None and self.dp:
                    scaffold.apply_correction_step(model, learning_rate=LEARNING_RATE)
                steps += 1
        return steps


def accuracy(weights: dict[str, np.ndarray], x: torch.Tensor, y: torch.Tensor) -> float:
    model = build_model("logistic_regression", in_features=len(FEATURE_COLUMNS))
    _load(model, weights)
    with torch.no_grad():
        predictions = (model(x) > 0).float()
    return float((predictions == y).float().mean())


def run_study(
    config: str, *, dp: bool, seed: int, rounds: int, central_dp: dict | None = None
) -> dict[str, Any]:
    """Train one study and return its pooled and per-site test accuracy."""
    torch.manual_seed(seed)
    sites = load_sites(seed)
    name, params, wrappers = CONFIGS[config]
    if central_dp is not None:
        wrappers = [*wrappers, ("central_dp", central_dp)]
    strategy = build_strategy(name, params, wrappers)
    model = build_model("logistic_regression", in_features=len(FEATURE_COLUMNS))
    weights = _state(model)

    with tempfile.TemporaryDirectory() as state_dir:
        trainers = [
            SiteTrainer(
                site, dp=dp, rounds=rounds, state_dir=Path(state_dir), seed=seed
            )
            for site in sites
        ]
        for _ in range(rounds):
            published = strategy.published_tensors()
            updates = [
                trainer.train(weights, strategy, published) for trainer in trainers
            ]
            weights = strategy.aggregate(weights, updates)

    test_x = torch.cat([site.test_x for site in sites])
    test_y = torch.cat([site.test_y for site in sites])
    result: dict[str, Any] = {
        "pooled": accuracy(weights, test_x, test_y),
        "per_site": {
            site.name: accuracy(weights, site.test_x, site.test_y) for site in sites
        },
        "site_epsilon": max(trainer.epsilon() for trainer in trainers),
    }
    if central_dp is not None:
        result["server_epsilon"] = strategy.epsilon()  # type: ignore[attr-defined]
    return result


def central_dp_params(rounds: int) -> dict[str, Any]:
    """Return central DP parameters for epsilon 1 over ``rounds`` at q = 1."""
    noise = get_noise_multiplier(
        target_epsilon=DP_EPSILON,
        target_delta=TARGET_DELTA,
        sample_rate=1.0,
        steps=rounds,
    )
    return {
        "clip_norm": 0.5,
        "noise_multiplier": noise,
        "total_sites": 4,
        "target_delta": TARGET_DELTA,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pooled = [run["pooled"] for run in runs]
    sites = runs[0]["per_site"].keys()
    summary: dict[str, Any] = {
        "pooled_mean": float(np.mean(pooled)),
        "pooled_std": float(np.std(pooled)),
        "per_site_mean": {
            site: float(np.mean([run["per_site"][site] for run in runs]))
            for site in sites
        },
        "site_epsilon": max(run["site_epsilon"] for run in runs),
    }
    if "server_epsilon" in runs[0]:
        summary["server_epsilon"] = max(run["server_epsilon"] for run in runs)
    return summary


def target_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Return a sentence on the target: FedAdam or FedYogi >= 0.79 without DP."""
    best = max(
        (
            row
            for row in rows
            if row["config"] in ("fedadam", "fedyogi") and row["dp"] == "none"
        ),
        key=lambda row: row["summary"]["pooled_mean"],
        default=None,
    )
    if best is None:
        return []
    accuracy_value = best["summary"]["pooled_mean"]
    verdict = "meets" if accuracy_value >= 0.79 else "misses"
    return [
        f"Target: FedAdam or FedYogi at >= 0.79 pooled accuracy without DP. "
        f"{best['config']} reaches {accuracy_value:.3f}, so this run {verdict} it."
    ]


def write_docs(report: dict[str, Any]) -> None:
    sites = list(HOSPITALS)
    lines = [
        "# Aggregation strategies on the heart-disease hospitals",
        "",
        "Produced by `python benchmarks/strategies.py` "
        f"({report['seeds']} seeds, {report['rounds']} rounds, "
        f"{LOCAL_EPOCHS} local epoch of batch {BATCH_SIZE}, local SGD learning "
        f"rate {LEARNING_RATE}) on {report['machine']}; raw numbers are in "
        "`benchmarks/results/strategies.json`.",
        "",
        "Four sites, one per UCI hospital file, each split 66/34 into train and "
        "test with the seed, and 13 features standardized with federated "
        "statistics. Accuracy is on the held-out test records: pooled over all "
        "four sites, and per site (mean over seeds). The runs call medfed's "
        "strategies and site helpers in one process, without the Prefect flow "
        "or the aggregation service.",
        "",
        "DP rows train every site with Opacus DP-SGD at epsilon "
        f"{DP_EPSILON} (delta {TARGET_DELTA}) over the whole study, clip norm "
        f"{MAX_GRAD_NORM}. The central DP row instead adds site-level noise at the "
        f"server for epsilon {DP_EPSILON} over all rounds, with no DP-SGD at the "
        "sites.",
        "",
        "| strategy | DP | pooled accuracy | " + " | ".join(sites) + " | max epsilon |",
        "| --- | --- | --- | " + " | ".join("---" for _ in sites) + " | --- |",
    ]
    for row in report["rows"]:
        summary = row["summary"]
        epsilon_value = summary.get("server_epsilon", summary["site_epsilon"])
        epsilon = f"{epsilon_value:.2f}" if row["dp"] != "none" else "-"
        per_site = " | ".join(f"{summary['per_site_mean'][site]:.3f}" for site in sites)
        lines.append(
            f"| {row['config']} | {row['dp']} | {summary['pooled_mean']:.3f} "
            f"± {summary['pooled_std']:.3f} | {per_site} | {epsilon} |"
        )
    central = next(row for row in report["rows"] if row["dp"] == "central")
    lines += [
        "",
        "Pooled accuracy is the mean ± standard deviation over seeds; per-site "
        "columns are means.",
        "",
        *report["notes"],
        "",
        "Reading the table:",
        "",
        "- Differences between the unwrapped strategies (under 0.01) are well "
        "inside the spread over seeds (about 0.02).",
        "- With four sites, `trimmed_mean` at beta 0.25 drops one value per end "
        "and averages the middle two, which is the median, so their rows match.",
        "- `norm_bound` at max_norm 1.0 matches `fedavg` to three decimals: the "
        "hospitals' deltas rarely or never exceed the bound.",
        "- `krum` keeps one hospital's update per round, which costs Switzerland, "
        "the smallest and most different site, the most.",
        "- Central DP at epsilon 1 over "
        f"{report['rounds']} rounds with only four sites needs noise multiplier "
        f"{central['params']['noise_multiplier']:.1f} on a sum of four clipped "
        "updates, so the noise drowns the signal. Site-level DP needs many more "
        "sites per round.",
        "- For comparison, FLamby (Terrail et al., NeurIPS 2022) reports about "
        "0.79 for pooled training and 0.75 for FedAvg on the same four-hospital "
        "split, with its own preprocessing and training settings.",
        "",
    ]
    lines += flow_section()
    DOCS.write_text("\n".join(lines))


def flow_section() -> list[str]:
    """Return the docs section for ``benchmarks/strategies_flow.py``, if it ran."""
    flow_results = RESULTS.with_name("strategies_flow.json")
    if not flow_results.exists():
        return []
    rows = json.loads(flow_results.read_text())["rows"]
    sites = list(rows[0]["per_site"])
    lines = [
        "## Through the flow",
        "",
        "Produced by `python benchmarks/strategies_flow.py`: the shipped study "
        "configs (`configs/heart_disease_nodp.yaml`, and `configs/heart_disease.yaml` "
        "for site DP-SGD at epsilon 1) with each strategy swapped in, run by "
        "`run_study` with Prefect, the aggregation service on 127.0.0.1 and "
        "MLflow. One run per row, with those configs' own preprocessing (15 "
        "features), 5 local epochs and learning rate 0.05, so the numbers differ "
        "from the table above. Wall seconds are whole studies on a 2-core machine "
        "shared with other jobs, so they show load more than speed.",
        "",
        "| strategy | DP | pooled accuracy | " + " | ".join(sites) + " | wall s |",
        "| --- | --- | --- | " + " | ".join("---" for _ in sites) + " | --- |",
    ]
    for row in rows:
        per_site = " | ".join(f"{row['per_site'][site]:.3f}" for site in sites)
        lines.append(
            f"| {row['config']} | {row['dp']} | {row['pooled']:.3f} | {per_site} "
            f"| {row['wall_seconds']} |"
        )
    best = max(
        (row for row in rows if row["config"] in ("fedadam", "fedyogi")),
        key=lambda row: row["pooled"],
        default=None,
    )
    if best is not None:
        lines += [
            "",
            "Each row is a single run, so differences under about 0.03 (ten test "
            "records) are within run-to-run noise. Through the flow, the best of "
            f"FedAdam and FedYogi reaches {best['pooled']:.3f} ({best['config']}, "
            f"{best['dp']}), below the 0.79 that the in-process runs reach. The "
            "server learning rates were tuned for the in-process setup and not "
            "retuned for these configs. `fedavg+krum` without DP keeps one "
            "hospital's update per round, and with 5 local epochs that update "
            "fits its own hospital only.",
        ]
    return [*lines, ""]


def make_row(
    config: str, dp: str, runs: list[dict[str, Any]], **details: Any
) -> dict[str, Any]:
    """Summarize one configuration's runs and print its pooled accuracy."""
    summary = summarize(runs)
    print(f"{config:22s} {dp:12s} pooled {summary['pooled_mean']:.3f}", flush=True)
    return {"config": config, "dp": dp, "summary": summary, "runs": runs, **details}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (runs)")
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds")
    parser.add_argument(
        "--configs", nargs="*", default=list(CONFIGS), help="strategy configs to run"
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite the docs page from the saved JSON without training",
    )
    arguments = parser.parse_args()
    if arguments.docs_only:
        write_docs(json.loads(RESULTS.read_text()))
        return
    warnings.filterwarnings("ignore")
    logging.disable(logging.INFO)

    started = time.time()
    rows = []
    for config in arguments.configs:
        for dp in (False, True):
            runs = [
                run_study(config, dp=dp, seed=seed, rounds=arguments.rounds)
                for seed in range(arguments.seeds)
            ]
            label = "site DP-SGD" if dp else "none"
            rows.append(make_row(config, label, runs))
    central = central_dp_params(arguments.rounds)
    runs = [
        run_study(
            "fedavg", dp=False, seed=seed, rounds=arguments.rounds, central_dp=central
        )
        for seed in range(arguments.seeds)
    ]
    rows.append(make_row("fedavg+central_dp", "central", runs, params=central))

    report = {
        "benchmark": "strategies",
        "seeds": arguments.seeds,
        "rounds": arguments.rounds,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "elapsed_seconds": round(time.time() - started, 1),
        "configs": {
            name: {"strategy": s, "params": p, "wrappers": w}
            for name, (s, p, w) in CONFIGS.items()
        },
        "rows": rows,
        "notes": target_notes(rows),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    write_docs(report)


if __name__ == "__main__":
    main()
