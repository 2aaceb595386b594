"""Test AUC against bytes uploaded for each codec on the pneumonia study.

Runs the five-site PneumoniaMNIST study (``configs/pneumonia_nodp.yaml``
without DP, ``configs/pneumonia_dp_resnet.yaml`` with DP-SGD at epsilon 8
per site, both on ``resnet_gn``) once per codec: fp32, fp16, int8, top-k 10%
and 1%, top-k 10% with a bitmap of positions and int8 values, the 4-bit and
2-bit lowbit quantizer, and int8 at a step of one root mean square with
zstd. The sparse and lowbit codecs use error feedback, and 2-bit lowbit also
runs without it. Each run is a real ``medfed run`` (Prefect flow,
aggregation service on 127.0.0.1, MLflow). For each run it records the
pooled test AUC and accuracy, the bytes every site uploaded over the study,
and the ratio of fp32's bytes to the codec's. Results go to
``benchmarks/results/compression_pneumonia.json``; the encode and decode
throughput of each codec is measured by ``benchmarks/codec_throughput.py``.

With ``--study NAME`` every run of a privacy setting takes that study name,
so all codecs see the same batches and the same DP noise (sites derive their
seeds from the study name) and differ only in their rounding: a paired
comparison. Results then go under ``<privacy>-<codec>@<NAME>``. Without it
each codec runs under its own study name.

Run: ``python benchmarks/compression_pneumonia.py [--privacy off on]
[--codecs fp32 topk1] [--rounds N] [--study NAME]``
"""

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from study_run import run_study_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compression_pneumonia.json"
#: Both settings train resnet_gn (77,169 parameters), so the byte ratios
#: compare updates of one size.
CONFIGS = {
    "off": "configs/pneumonia_nodp.yaml",
    "on": "configs/pneumonia_dp_resnet.yaml",
}
CODECS: dict[str, dict[str, Any]] = {
    "fp32": {"codec": "fp32"},
    "fp16": {"codec": "fp16"},
    "int8": {"codec": "int8"},
    "topk10": {"codec": "topk", "params": {"fraction": 0.1}},
    "topk1": {"codec": "topk", "params": {"fraction": 0.01}},
    "topk10-bitmap-int8": {
        "codec": "topk",
        "params": {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": "int8"},
        "error_feedback": True,
    },
    "lowbit4": {
        "codec": "lowbit",
        "params": {"bits": 4, "chunk_size": 256},
        "error_feedback": True,
    },
    "lowbit2": {
        "codec": "lowbit",
        "params": {"bits": 2, "chunk_size": 256},
        "error_feedback": True,
    },
    # Without error feedback the rounding stays unbiased and is not carried
    # over, which matters under DP, where most of each update is noise.
    "lowbit2-noef": {
        "codec": "lowbit",
        "params": {"bits": 2, "chunk_size": 256},
        "error_feedback": False,
    },
    # int8 levels at a step of one root mean square: a DP-noised update then
    # takes about 9 levels, which zstd at level 19 entropy-codes in about 2.3
    # bits each. Stochastic rounding keeps it unbiased without error feedback.
    "int8-rms1-zstd": {
        "codec": "int8",
        "params": {"chunk_size": 4096, "step_rms": 1.0},
        "zstd": True,
        "zstd_level": 19,
        "error_feedback": False,
    },
}
#: The target: at least this many times fewer bytes than fp32 ...
TARGET_RATIO = 10.0
#: ... at no more than this loss of test AUC.
TARGET_AUC_LOSS = 0.01


def run_one(
    privacy: str, codec: str, work_root: Path, rounds: int | None, study: str | None
) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / CONFIGS[privacy]).read_text(encoding="utf-8"))
    raw["study"] = study or f"{raw['study']}-{codec}"
    raw["compression"] = CODECS[codec]
    if rounds is not None:
        raw["training"]["rounds"] = rounds
    work = work_root / result_key(privacy, codec, study)
    summary, wall = run_study_config(raw, work)
    sites = summary["sites"]
    return {
        "config": CONFIGS[privacy],
        "study": raw["study"],
        "compression": CODECS[codec],
        "rounds": summary["rounds"],
        "test_auc": summary["pooled_test_auc"],
        "test_accuracy": summary["pooled_test_accuracy"],
        "bytes_uploaded": sum(info["bytes_uploaded"] for info in sites.values()),
        "bytes_uploaded_per_site": {
            site: info["bytes_uploaded"] for site, info in sites.items()
        },
        "max_epsilon_spent": max(
            (info["epsilon_spent"] or 0.0 for info in sites.values()), default=0.0
        ),
        "wall_seconds": wall,
    }


def result_key(privacy: str, codec: str, study: str | None) -> str:
    return f"{privacy}-{codec}" if study is None else f"{privacy}-{codec}@{study}"


def compare(results: dict[str, dict[str, Any]]) -> None:
    """Add each codec's byte ratio and AUC loss against fp32 of the same run set.

    A run under ``--study NAME`` is compared with fp32 under the same name.
    Other runs are compared with fp32 under its own study name.
    """
    for key, result in results.items():
        privacy, _, rest = key.partition("-")
        study = rest.partition("@")[2] or None
        baseline = results.get(result_key(privacy, "fp32", study))
        if baseline is None:
            continue
        ratio = baseline["bytes_uploaded"] / max(result["bytes_uploaded"], 1)
        loss = baseline["test_auc"] - result["test_auc"]
        result["bytes_ratio_vs_fp32"] = ratio
        result["auc_loss_vs_fp32"] = loss
        result["meets_target"] = ratio >= TARGET_RATIO and loss <= TARGET_AUC_LOSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--privacy", nargs="+", choices=sorted(CONFIGS), default=["off", "on"]
    )
    parser.add_argument(
        "--codecs", nargs="+", choices=list(CODECS), default=list(CODECS)
    )
    parser.add_argument("--rounds", type=int, help="override training.rounds")
    parser.add_argument(
        "--study", help="one study name for every run, for a paired comparison"
    )
    parser.add_argument(
        "--work-root", type=Path, default=ROOT / ".medfed" / "bench-compression"
    )
    args = parser.parse_args()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for privacy in args.privacy:
        for codec in args.codecs:
            key = result_key(privacy, codec, args.study)
            results[key] = run_one(
                privacy, codec, args.work_root, args.rounds, args.study
            )
            compare(results)
            RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            print(json.dumps({key: results[key]}, indent=2))


if __name__ == "__main__":
    main()
