"""Measure the cost of secure aggregation: plain, masking and CKKS.

It runs 4, 10 and 20 sites with two update sizes: a 16-value
logistic-regression update and a 105,866-parameter small CNN. Per site it
records the bytes sent and the time to encode (and mask or encrypt) an
update. At the service it records the time to combine the round. Results go to
``benchmarks/results/secagg_cost.json``; the figures are discussed on
``docs/benchmarks-secagg.md``.

Run from the repository root::

    PYTHONPATH=. python benchmarks/secagg_cost.py [--repeats 3]
"""

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medfed.contract.secagg import FixedPointEncoding, MaskingServer, MaskingSite
from medfed.contract.secagg.layout import VectorLayout
from medfed.contract.wire import decode_envelope, encode_envelope

RESULTS = Path(__file__).parent / "results" / "secagg_cost.json"
SITE_COUNTS = (4, 10, 20)
STUDY = "bench"
NONCE = "0123456789abcdef"
SAMPLE_COUNT = 1000
MODELS = {
    "logistic_regression": {"weight": (1, 15), "bias": (1,)},
    # A two-convolution MNIST-sized network: 105,866 parameters.
    "small_cnn": {
        "conv1.weight": (16, 1, 3, 3),
        "conv1.bias": (16,),
        "conv2.weight": (32, 16, 3, 3),
        "conv2.bias": (32,),
        "fc1.weight": (64, 1568),
        "fc1.bias": (64,),
        "fc2.weight": (10, 64),
        "fc2.bias": (10,),
    },
}
ENCODING_PARAMETERS = {"fractional_bits": 10, "clip": 1.0, "max_weight": 5000}


def median_seconds(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Return the median wall time of ``function`` over ``repeats`` calls and
    its last result."""
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def make_updates(shapes: dict, site_count: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(site_count)
    return {
        f"site-{index:02d}": {
            name: rng.normal(0.0, 0.05, shape).astype(np.float32)
            for name, shape in shapes.items()
        }
        for index in range(site_count)
    }


def envelope(update: dict, site: str, **codec: Any) -> bytes:
    return encode_envelope(
        update,
        study=STUDY,
        round_number=1,
        site=site,
        sample_count=SAMPLE_COUNT,
        nonce=NONCE,
        **codec,
    )


def measure_plain(updates: dict, repeats: int) -> dict:
    site = next(iter(updates))
    encode_seconds, data = median_seconds(
        lambda: envelope(updates[site], site), repeats
    )
    envelopes = {name: envelope(update, name) for name, update in updates.items()}

    def combine() -> dict:
        total: dict[str, np.ndarray] = {}
        for data in envelopes.values():
            for key, value in decode_envelope(data).tensors.items():
                weighted = value.astype(np.float64) * SAMPLE_COUNT
                total[key] = total[key] + weighted if key in total else weighted
        return total

    server_seconds, _ = median_seconds(combine, repeats)
    return {
        "bytes_sent_per_site": len(data),
        "payload_bytes_per_site": len(data),
        "site_seconds": encode_seconds,
        "server_seconds": server_seconds,
    }


def masking_round(updates: dict, dropped: str | None) -> dict:
    """Run one masking round with timings; ``dropped`` shares keys, then leaves."""
    site_count = len(updates)
    encoding = FixedPointEncoding(site_count=site_count, **ENCODING_PARAMETERS)
    layout = VectorLayout.of(next(iter(updates.values())))
    server = MaskingServer(
        study=STUDY,
        round_number=1,
        threshold=site_count // 2 + 1,
        encoding=encoding,
        vector_length=layout.length,
    )
    sites = {
        name: MaskingSite(site=name, study=STUDY, round_number=1, encoding=encoding)
        for name in updates
    }
    sent = dict.fromkeys(sites, 0)
    setup = dict.fromkeys(sites, 0.0)
    for name, site in sites.items():
        start = time.perf_counter()
        advertisement = site.advertise()
        setup[name] += time.perf_counter() - start
        sent[name] += len(advertisement.model_dump_json())
        server.add_advertisement(advertisement)
    roster = server.close_advertising()
    for name, site in sites.items():
        start = time.perf_counter()
        upload = site.share_keys(roster)
        setup[name] += time.perf_counter() - start
        sent[name] += len(upload.model_dump_json())
        server.add_share_upload(upload)
    server.close_sharing()

    mask_seconds = []
    payload = {}
    envelopes = {}
    for name, site in sites.items():
        start = time.perf_counter()
        site.receive_shares(server.shares_for(name))
        setup[name] += time.perf_counter() - start
        if name == dropped:
            continue
        start = time.perf_counter()
        masked = site.mask_update(updates[name], sample_count=SAMPLE_COUNT)
        data = envelope(
            masked,
            name,
            codec_name="masked",
            codec_params={"fractional_bits": encoding.fractional_bits},
        )
        mask_seconds.append(time.perf_counter() - start)
        payload[name] = len(data)
        sent[name] += len(data)
        envelopes[name] = data

    # The service's time covers decoding every envelope, storing the masked
    # vectors and unmasking, like the plain figure covers decoding and summing.
    start = time.perf_counter()
    for name, data in envelopes.items():
        decoded = decode_envelope(data)
        vector = layout.join(decoded.tensors)
        server.add_masked_update(name, vector, sample_count=decoded.header.sample_count)
    server_seconds = time.perf_counter() - start

    request = server.close_uploads()
    for name in request.survivors:
        revealed = sites[name].reveal(request)
        sent[name] += len(revealed.model_dump_json())
        server.add_reveal(revealed)
    start = time.perf_counter()
    result = server.unmask()
    server_seconds += time.perf_counter() - start

    expected = sum(
        np.clip(layout.flatten(updates[name]), -1.0, 1.0) * SAMPLE_COUNT
        for name in request.survivors
    )
    error = float(np.max(np.abs(result.weighted_sum - expected)))
    survivor = request.survivors[0]
    return {
        "bytes_sent_per_site": sent[survivor],
        "payload_bytes_per_site": payload[survivor],
        "protocol_bytes_per_site": sent[survivor] - payload[survivor],
        "site_setup_seconds": statistics.median(setup.values()),
        "site_seconds": statistics.median(mask_seconds),
        "server_seconds": server_seconds,
        "max_abs_error_weighted": error,
        "error_bound_weighted": encoding.error_bound(len(request.survivors)),
    }


def measure_masking(updates: dict, repeats: int, dropped: str | None) -> dict:
    runs = [masking_round(updates, dropped) for _ in range(repeats)]
    return {
        key: statistics.median(run[key] for run in runs)
        if key.endswith("seconds")
        else runs[-1][key]
        for key in runs[0]
    }


def measure_ckks(updates: dict, repeats: int) -> dict:
    from medfed.contract.secagg.ckks import CkksAggregator, CkksSiteContext

    context = CkksSiteContext.create()
    public = context.public_bytes()
    layout = VectorLayout.of(next(iter(updates.values())))
    site = next(iter(updates))

    def encrypt() -> list[bytes]:
        return context.encrypt_update(
            updates[site], sample_count=SAMPLE_COUNT, clip=1.0
        )

    encrypt_seconds, chunks = median_seconds(encrypt, repeats)
    encrypted = {
        name: context.encrypt_update(update, sample_count=SAMPLE_COUNT, clip=1.0)
        for name, update in updates.items()
    }

    def combine() -> list[bytes]:
        aggregator = CkksAggregator(public, vector_length=layout.length)
        for name, parts in encrypted.items():
            aggregator.add(name, parts, sample_count=SAMPLE_COUNT)
        return aggregator.aggregate()

    server_seconds, aggregate = median_seconds(combine, repeats)
    decrypt_seconds, decrypted = median_seconds(
        lambda: context.decrypt_vector(aggregate, layout.length), repeats
    )
    expected = sum(
        np.clip(layout.flatten(update), -1.0, 1.0) * SAMPLE_COUNT
        for update in updates.values()
    )
    payload = sum(len(chunk) for chunk in chunks)
    return {
        "bytes_sent_per_site": payload,
        "payload_bytes_per_site": payload,
        "ciphertexts_per_site": len(chunks),
        "public_context_bytes": len(public),
        "site_seconds": encrypt_seconds,
        "server_seconds": server_seconds,
        "site_decrypt_seconds": decrypt_seconds,
        "max_abs_error_weighted": float(np.max(np.abs(decrypted - expected))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per figure (median)"
    )
    arguments = parser.parse_args()

    rows = []
    for model, shapes in MODELS.items():
        for site_count in SITE_COUNTS:
            updates = make_updates(shapes, site_count)
            plain = measure_plain(updates, arguments.repeats)
            mechanisms = {
                "plain": plain,
                "masking": measure_masking(updates, arguments.repeats, None),
                "masking_one_dropout": measure_masking(
                    updates, arguments.repeats, next(iter(updates))
                ),
                "ckks": measure_ckks(updates, arguments.repeats),
            }
            for mechanism, figures in mechanisms.items():
                figures["bytes_ratio_vs_plain"] = (
                    figures["bytes_sent_per_site"] / plain["bytes_sent_per_site"]
                )
                figures["payload_ratio_vs_plain"] = (
                    figures["payload_bytes_per_site"] / plain["payload_bytes_per_site"]
                )
                rows.append(
                    {
                        "model": model,
                        "parameters": VectorLayout.from_shapes(shapes).length,
                        "sites": site_count,
                        "mechanism": mechanism,
                        **figures,
                    }
                )
                print(
                    f"{model:20s} {site_count:3d} {mechanism:20s} "
                    f"bytes {figures['bytes_sent_per_site']:>10d} "
                    f"({figures['bytes_ratio_vs_plain']:7.2f}x) "
                    f"site {figures['site_seconds'] * 1e3:8.2f} ms "
                    f"server {figures['server_seconds'] * 1e3:9.2f} ms"
                )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "script": "benchmarks/secagg_cost.py",
                "repeats": arguments.repeats,
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "encoding": ENCODING_PARAMETERS | {"ring_bits": 32},
                "ckks": {
                    "poly_modulus_degree": 8192,
                    "coeff_mod_bit_sizes": [60, 60],
                    "scale_bits": 30,
                },
                "sample_count_per_site": SAMPLE_COUNT,
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
