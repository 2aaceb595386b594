"""Measure codec throughput and bytes on the wire.

For each codec and update size, times ``encode`` and ``decode`` (MB/s of
float32 input, median of several repeats) and counts the bytes of a full
envelope with and without zstd. Updates are normal(0, 0.01) float32 deltas
split over a few tensors, like a small CNN (~100k parameters) and a larger
model (1M parameters).

Run: ``PYTHONPATH=. python benchmarks/codec_throughput.py``. Writes
``benchmarks/results/codec_throughput.json`` and prints a Markdown table.
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medfed.contract.codecs import get_codec
from medfed.contract.wire import encode_envelope

__all__ = ["main"]

CODECS = [
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("int8", "int8", {}),
    ("int8 chunk 1024", "int8", {"chunk_size": 1024}),
    ("topk 10%", "topk", {"fraction": 0.1}),
    ("topk 1%", "topk", {"fraction": 0.01}),
    ("topk 1% fp16", "topk", {"fraction": 0.01, "value_dtype": "float16"}),
    (
        "topk 10% bitmap fp16",
        "topk",
        {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": "float16"},
    ),
    (
        "topk 10% bitmap int8",
        "topk",
        {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": "int8"},
    ),
    # No "topk 1% bitmap" row: below a fraction of 1/32, a bitmap's d / 8
    # bytes exceed the 4 * fraction * d bytes of int32 indices.
    ("randk 10%", "randk", {"fraction": 0.1}),
    ("lowbit 4-bit", "lowbit", {"bits": 4}),
    ("lowbit 2-bit", "lowbit", {"bits": 2}),
    ("lowbit 2-bit chunk 256", "lowbit", {"bits": 2, "chunk_size": 256}),
    ("int8 step 1 rms chunk 4096", "int8", {"chunk_size": 4096, "step_rms": 1.0}),
]
#: zstd levels other than 3, by row label. Level 19 entropy-codes the few
#: levels that a step of one root mean square leaves.
ZSTD_LEVELS = {"int8 step 1 rms chunk 4096": 19}

UPDATES = {
    "100k": {
        "conv1.weight": (32, 1, 5, 5),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3),
        "conv2.bias": (64,),
        "fc1.weight": (128, 576),
        "fc1.bias": (128,),
        "fc2.weight": (2, 128),
        "fc2.bias": (2,),
    },
    "1M": {
        "encoder.weight": (1000, 784),
        "encoder.bias": (1000,),
        "hidden.weight": (200, 1000),
        "hidden.bias": (200,),
        "head.weight": (80, 200),
        "head.bias": (80,),
    },
}


def make_update(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(0.0, 0.01, size=shape).astype(np.float32)
        for name, shape in shapes.items()
    }


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    action()  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def envelope_bytes(update, codec_name, params, compression, zstd_level=3) -> int:
    envelope = encode_envelope(
        update,
        study="bench",
        round_number=1,
        site="site-a",
        sample_count=100,
        nonce="0" * 32,
        codec_name=codec_name,
        codec_params=params,
        compression=compression,
        zstd_level=zstd_level,
    )
    return len(envelope)


def measure(label, codec_name, params, size_label, update, repeats) -> dict:
    codec = get_codec(codec_name, params)
    specs = [(name, value.shape, "float32") for name, value in update.items()]
    payload = codec.encode(update)
    decoder = get_codec(codec_name, codec.params)
    input_mb = sum(value.nbytes for value in update.values()) / 1e6
    encode_s = median_seconds(lambda: codec.encode(update), repeats)
    decode_s = median_seconds(lambda: decoder.decode(payload, specs), repeats)
    raw_bytes = envelope_bytes(update, codec_name, params, "none")
    zstd_level = ZSTD_LEVELS.get(label, 3)
    zstd_bytes = envelope_bytes(update, codec_name, params, "zstd", zstd_level)
    return {
        "codec": label,
        "codec_name": codec_name,
        "params": params,
        "update": size_label,
        "parameters": int(sum(value.size for value in update.values())),
        "input_bytes": int(input_mb * 1e6),
        "encode_seconds": encode_s,
        "decode_seconds": decode_s,
        "encode_mb_per_s": input_mb / encode_s,
        "decode_mb_per_s": input_mb / decode_s,
        "envelope_bytes": raw_bytes,
        "envelope_bytes_zstd": zstd_bytes,
        "zstd_level": zstd_level,
    }


def markdown_table(rows: list[dict]) -> str:
    fp32 = {
        row["update"]: row["envelope_bytes"] for row in rows if row["codec"] == "fp32"
    }
    lines = [
        "| update | codec | encode MB/s | decode MB/s | bytes | bytes (zstd) "
        "| vs fp32 | vs fp32 (zstd) | fewer bytes than fp32 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        base = fp32[row["update"]]
        lines.append(
            f"| {row['update']} | {row['codec']} | {row['encode_mb_per_s']:.0f} "
            f"| {row['decode_mb_per_s']:.0f} | {row['envelope_bytes']:,} "
            f"| {row['envelope_bytes_zstd']:,} "
            f"| {row['envelope_bytes'] / base:.3f} "
            f"| {row['envelope_bytes_zstd'] / base:.3f} "
            f"| {base / row['envelope_bytes']:.1f}x |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).parent / "results" / "codec_throughput.json",
        help="path of the JSON results file",
    )
    args = parser.parse_args()

    rows = []
    for size_label, shapes in UPDATES.items():
        update = make_update(shapes, seed=0)
        for label, codec_name, params in CODECS:
            rows.append(
                measure(label, codec_name, params, size_label, update, args.repeats)
            )
    results = {
        "benchmark": "codec_throughput",
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            # Other processes share the machine; a high load average means
            # the timings are pessimistic and noisy.
            "load_average_1min": os.getloadavg()[0],
        },
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temporary, args.output)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
