"""Time one DP-SGD step of the imaging model: non-private, Opacus, fast path.

Measures in one process the median wall time of a training step (forward,
backward, optimizer step) at batch 64 on 1 x 28 x 28 inputs for:

- ``nonprivate``: plain SGD, the baseline;
- ``opacus_hooks``: Opacus ``GradSampleModule`` + ``DPOptimizer`` (hooks);
- ``opacus_ghost``: Opacus ghost clipping (``grad_sample_mode="ghost"``);
- ``fastdp``: ``medfed.sites.fastdp.private_gradient`` + SGD, noise from
  torch's generator (as Opacus draws it);
- ``fastdp_keyed``: the same with the noise sites train with: four ChaCha20
  Box-Muller draws per value from ``medfed.dp_random.KeyedRandom``.

After a warm-up the variants run interleaved, one step each per repetition,
so load from other processes on the machine affects all of them alike.
Writes ``benchmarks/results/dp_step_time.json`` with the medians and each
variant's ratio to the non-private step.

Run: ``python benchmarks/dp_step_time.py [--repeats 40] [--batch 64] [--threads N]``
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from medfed.contract.models import build_model
from medfed.dp_random import KeyedRandom
from medfed.sites.fastdp import private_gradient

RESULTS = Path(__file__).parent / "results" / "dp_step_time.json"
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def make_steps(
    model_name: str, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, Callable[[], None]]:
    """Build one step function per variant, each with its own model copy."""
    batch = images.shape[0]
    steps: dict[str, Callable[[], None]] = {}

    plain = build_model(model_name)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)

    def nonprivate() -> None:
        plain_opt.zero_grad()
        F.binary_cross_entropy_with_logits(plain(images), labels).backward()
        plain_opt.step()

    steps["nonprivate"] = nonprivate

    hooked = GradSampleModule(build_model(model_name))
    hooked_opt = DPOptimizer(
        torch.optim.SGD(hooked.parameters(), lr=0.01),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=batch,
    )

    def opacus_hooks() -> None:
        hooked_opt.zero_grad()
        F.binary_cross_entropy_with_logits(hooked(images), labels).backward()
        hooked_opt.step()

    steps["opacus_hooks"] = opacus_hooks

    ghost_model = build_model(model_name)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch)
    ghost, ghost_opt, ghost_loss, _ = PrivacyEngine().make_private(
        module=ghost_model,
        optimizer=torch.optim.SGD(ghost_model.parameters(), lr=0.01),
        data_loader=loader,
        criterion=torch.nn.BCEWithLogitsLoss(),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        grad_sample_mode="ghost",
    )

    def opacus_ghost() -> None:
        ghost_opt.zero_grad()
        ghost_loss(ghost(images), labels).backward()
        ghost_opt.step()

    steps["opacus_ghost"] = opacus_ghost

    steps["fastdp"] = fastdp_step(model_name, images, labels, None)
    steps["fastdp_keyed"] = fastdp_step(
        model_name, images, labels, KeyedRandom.from_entropy()
    )
    return steps


def fastdp_step(
    model_name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    noise_source: KeyedRandom | None,
) -> Callable[[], None]:
    """Build a fast-path DP step; noise from ``noise_source`` or torch's generator."""
    model = build_model(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad()
        private_gradient(
            model,
            per_sample_loss,
            images,
            labels,
            max_grad_norm=MAX_GRAD_NORM,
            noise_multiplier=NOISE_MULTIPLIER,
            expected_batch_size=images.shape[0],
            noise_source=noise_source,
        )
        optimizer.step()

    return step


def measure(
    steps: dict[str, Callable[[], None]], *, warmup: int, repeats: int
) -> dict[str, list[float]]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_gn", help="registered model name")
    parser.add_argument("--batch", type=int, default=64, help="samples per step")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps each")
    parser.add_argument("--repeats", type=int, default=40, help="timed steps each")
    parser.add_argument("--threads", type=int, help="torch threads; default: torch's")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    images = torch.rand(args.batch, 1, 28, 28)
    labels = (torch.rand(args.batch) > 0.5).float()
    steps = make_steps(args.model, images, labels)
    times = measure(steps, warmup=args.warmup, repeats=args.repeats)

    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians["nonprivate"]
    result = {
        "model": args.model,
        "batch": args.batch,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "machine": platform.machine(),
        "median_seconds": medians,
        "ratio_to_nonprivate": {
            name: value / baseline for name, value in medians.items()
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
