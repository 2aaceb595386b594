"""Load test of the aggregation service over mutual TLS on loopback.

Provisions a study of N sites (default 100), starts ``python -m
medfed.aggregation`` with the aggregation kit, then:

1. every site uploads one signed update for round 0 at the same time, each
   over its own TLS connection with its own client certificate. All must be
   accepted, and the round is finalized with all N updates;
2. round 1 is opened and sites send M malformed requests for it (default
   1,000, ten kinds, 50 at a time); every one must be rejected with a 4xx
   status, none with 2xx or 5xx, and round 1 must still have no upload;
3. the audit log is verified.

A probe calls ``/health`` every 0.2 s throughout and counts failures. The
service's peak resident set size is read from ``/proc/<pid>/status``
(VmHWM) at the end.

Run: ``PYTHONPATH=. python benchmarks/load_test.py``. Writes
``benchmarks/results/load_test.json`` and prints a summary.
"""

import argparse
import asyncio
import hashlib
import json
import os
import pickle
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.audit import verify
from medfed.contract.kits import KitFiles, client_ssl_context, site_kit_name
from medfed.contract.signing import Ed25519Signer
from medfed.contract.wire import _PREFIX, EnvelopeHeader, encode_envelope
from medfed.provision import provision

__all__ = ["main"]

STUDY = "load"
SHAPES = {"encoder.weight": (256, 256), "encoder.bias": (256,), "head.weight": (2, 256)}
MALFORMED_KINDS = (
    "garbage",
    "pickle",
    "truncated",
    "bad_signature",
    "unknown_codec",
    "unsigned",
    "other_site_path",
    "future_round",
    "huge_tensor",
    "traversal_path",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--malformed", type=int, default=1000)
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/load_test.json")
    )
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medfed-load-") as scratch:
        result = run(Path(scratch), arguments.sites, arguments.malformed)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["summary"], indent=2))


def run(scratch: Path, site_count: int, malformed_count: int) -> dict[str, Any]:
    sites = [f"site{index:03d}" for index in range(site_count)]
    config = scratch / "study.yaml"
    config.write_text(
        f"study: {STUDY}\n"
        "data: {dataset: heart_disease}\n"
        "model: {name: logistic_regression, params: {in_features: 15}}\n"
        "training: {rounds: 1, learning_rate: 0.05}\n"
        "sites:\n" + "".join(f"  - id: {site}\n" for site in sites),
        encoding="utf-8",
    )
    started = time.perf_counter()
    kits = provision(config, scratch / "kits")
    provision_seconds = time.perf_counter() - started

    service = _Service(scratch / "state", kits["aggregation"], site_count)
    service.start()
    try:
        baseline_rss = service.rss_bytes()
        envelopes = {site: _envelope(kits, site, 0) for site in sites}
        next_envelopes = {site: _envelope(kits, site, 1) for site in sites}
        _create_study(service.url, kits, sites)
        report = asyncio.run(
            _exercise(service, kits, sites, envelopes, next_envelopes, malformed_count)
        )
        report["peak_rss_bytes"] = service.peak_rss_bytes()
        report["baseline_rss_bytes"] = baseline_rss
    finally:
        service.stop()
    audit = verify(scratch / "state" / "audit.jsonl")
    report["audit"] = {"ok": audit.ok, "entries": audit.entries}
    report["provision_seconds"] = provision_seconds
    report["summary"] = _summary(report, site_count, malformed_count)
    report["machine"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    report["envelope_bytes"] = len(envelopes[sites[0]])
    return report


async def _exercise(
    service: "_Service",
    kits: dict[str, Path],
    sites: list[str],
    envelopes: dict[str, bytes],
    next_envelopes: dict[str, bytes],
    malformed_count: int,
) -> dict[str, Any]:
    probe = _HealthProbe(service.url, kits["coordinator"])
    probe_task = asyncio.create_task(probe.run())
    clients = {
        site: _async_client(service.url, kits[site_kit_name(site)]) for site in sites
    }
    coordinator = _async_client(service.url, kits["coordinator"])
    try:
        started = time.perf_counter()
        uploads = await asyncio.gather(
            *(
                _timed_put(clients[site], _upload_path(0, site), envelopes[site])
                for site in sites
            )
        )
        upload_seconds = time.perf_counter() - started
        finalize = await _finalize(coordinator, 0)
        opened = await coordinator.post(
            f"/v1/studies/{STUDY}/rounds/1",
            json={"sites": sites, "quorum": len(sites), "deadline_seconds": 3600},
        )
        opened.raise_for_status()

        requests = [
            _malformed_request(
                kind, sites[index % len(sites)], sites, kits, next_envelopes
            )
            for index, kind in enumerate(
                MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
                for i in range(malformed_count)
            )
        ]
        statuses: Counter[str] = Counter()
        by_kind: dict[str, Counter[int]] = {kind: Counter() for kind in MALFORMED_KINDS}
        started = time.perf_counter()
        for offset in range(0, len(requests), 50):
            batch = requests[offset : offset + 50]
            responses = await asyncio.gather(
                *(
                    clients[site].request(method, path, content=body)
                    for kind, site, method, path, body in batch
                ),
                return_exceptions=True,
            )
            for (kind, *_), response in zip(batch, responses, strict=True):
                status = (
                    response.status_code if isinstance(response, httpx.Response) else 0
                )
                by_kind[kind][status] += 1
                statuses[_status_class(status)] += 1
        malformed_seconds = time.perf_counter() - started
        status = (await coordinator.get(f"/v1/studies/{STUDY}/rounds/1")).json()
    finally:
        probe.stop = True
        await probe_task
        await asyncio.gather(*(client.aclose() for client in clients.values()))
        await coordinator.aclose()

    latencies = [seconds for _, seconds in uploads]
    return {
        "uploads": {
            "count": len(uploads),
            "statuses": dict(Counter(str(status) for status, _ in uploads)),
            "wall_seconds": upload_seconds,
            "latency_seconds": {
                "median": statistics.median(latencies),
                "p95": float(np.percentile(latencies, 95)),
                "max": max(latencies),
            },
        },
        "malformed": {
            "count": len(requests),
            "status_classes": dict(statuses),
            "statuses_by_kind": {
                kind: {str(status): count for status, count in counter.items()}
                for kind, counter in by_kind.items()
            },
            "wall_seconds": malformed_seconds,
            "round_1_uploads_after": len(status["uploaded"]),
        },
        "finalize": finalize,
        "health": {"probes": probe.count, "failures": probe.failures},
    }


def _malformed_request(
    kind: str,
    site: str,
    sites: list[str],
    kits: dict[str, Path],
    envelopes: dict[str, bytes],
) -> tuple[str, str, str, str, bytes]:
    envelope = envelopes[site]
    path = _upload_path(1, site)
    if kind == "garbage":
        return kind, site, "PUT", path, os.urandom(4096)
    if kind == "pickle":
        return kind, site, "PUT", path, pickle.dumps({"weights": [1.0] * 1000})
    if kind == "truncated":
        return kind, site, "PUT", path, envelope[: len(envelope) // 2]
    if kind == "bad_signature":
        tampered = bytearray(envelope)
        tampered[len(tampered) // 2] ^= 0xFF
        return kind, site, "PUT", path, bytes(tampered)
    if kind == "unknown_codec":
        return (
            kind,
            site,
            "PUT",
            path,
            _resign(kits, site, envelope, {"codec": {"name": "pickle", "params": {}}}),
        )
    if kind == "unsigned":
        return kind, site, "PUT", path, _strip_signature(envelope)
    if kind == "other_site_path":
        other = sites[(sites.index(site) + 1) % len(sites)]
        return kind, site, "PUT", _upload_path(1, other), envelope
    if kind == "future_round":
        return kind, site, "PUT", _upload_path(7, site), _envelope(kits, site, 7)
    if kind == "huge_tensor":
        change = {"tensors": [{"name": "encoder.weight", "shape": [1 << 20, 1 << 20]}]}
        return kind, site, "PUT", path, _resign(kits, site, envelope, change)
    if kind == "traversal_path":
        return (
            kind,
            site,
            "PUT",
            f"/v1/studies/{STUDY}/rounds/1/updates/..%2F..%2Fetc",
            envelope,
        )
    raise ValueError(f"unknown malformed kind {kind!r}")


def _envelope(kits: dict[str, Path], site: str, round_number: int) -> bytes:
    generator = np.random.default_rng(
        int(site.removeprefix("site")) * 1000 + round_number
    )
    delta = {
        name: generator.normal(0, 0.01, shape).astype(np.float32)
        for name, shape in SHAPES.items()
    }
    signer = Ed25519Signer.from_file(kits[site_kit_name(site)] / KitFiles.SIGNING_KEY)
    return encode_envelope(
        delta,
        study=STUDY,
        round_number=round_number,
        site=site,
        sample_count=100 + int(site.removeprefix("site")),
        nonce=hashlib.sha256(f"{site}/{round_number}".encode()).hexdigest()[:32],
        signer=signer,
    )


def _resign(
    kits: dict[str, Path], site: str, envelope: bytes, change: dict[str, Any]
) -> bytes:
    header, payload = _split(envelope)
    header.pop("signature")
    header.update(change)
    signer = Ed25519Signer.from_file(kits[site_kit_name(site)] / KitFiles.SIGNING_KEY)
    parsed = EnvelopeHeader.model_validate(header)
    header["signature"] = {
        "algorithm": "ed25519",
        "key_id": signer.key_id,
        "value": signer.sign(parsed.signing_bytes()),
    }
    return _join(header, payload)


def _strip_signature(envelope: bytes) -> bytes:
    header, payload = _split(envelope)
    header.pop("signature")
    return _join(header, payload)


def _split(envelope: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, length = _PREFIX.unpack_from(envelope)
    header = json.loads(envelope[_PREFIX.size : _PREFIX.size + length])
    return header, envelope[_PREFIX.size + length :]


def _join(header: dict[str, Any], payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return _PREFIX.pack(b"MFED", 1, len(raw)) + raw + payload


def _create_study(url: str, kits: dict[str, Path], sites: list[str]) -> None:
    weights = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    settings = {"sites": sites, "strategy": "fedavg", "strategy_params": {}}
    body = save_safetensors(
        weights, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    with _client(url, kits["coordinator"]) as coordinator:
        coordinator.post(f"/v1/studies/{STUDY}", content=body).raise_for_status()
        coordinator.post(
            f"/v1/studies/{STUDY}/rounds/0",
            json={"sites": sites, "quorum": len(sites), "deadline_seconds": 3600},
        ).raise_for_status()


async def _finalize(
    coordinator: httpx.AsyncClient, round_number: int
) -> dict[str, Any]:
    started = time.perf_counter()
    response = await coordinator.post(
        f"/v1/studies/{STUDY}/rounds/{round_number}/finalize", json={}
    )
    seconds = time.perf_counter() - started
    body = response.json()
    return {
        "status": response.status_code,
        "state": body.get("state"),
        "uploaded": len(body.get("uploaded", [])),
        "seconds": seconds,
    }


async def _timed_put(
    client: httpx.AsyncClient, path: str, body: bytes
) -> tuple[int, float]:
    started = time.perf_counter()
    response = await client.put(path, content=body)
    return response.status_code, time.perf_counter() - started


def _status_class(status: int) -> str:
    return "transport error" if status == 0 else f"{status // 100}xx"


def _upload_path(round_number: int, site: str) -> str:
    return f"/v1/studies/{STUDY}/rounds/{round_number}/updates/{site}"


def _client(url: str, kit: Path) -> httpx.Client:
    return httpx.Client(base_url=url, verify=client_ssl_context(kit), timeout=120)


def _async_client(url: str, kit: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, verify=client_ssl_context(kit), timeout=120)


class _HealthProbe:
    def __init__(self, url: str, kit: Path) -> None:
        self.client = _async_client(url, kit)
        self.count = 0
        self.failures = 0
        self.stop = False

    async def run(self) -> None:
        async with self.client:
            while not self.stop:
                self.count += 1
                try:
                    response = await self.client.get("/health", timeout=10)
                    if response.status_code != 200:
                        self.failures += 1
                except httpx.HTTPError:
                    self.failures += 1
                await asyncio.sleep(0.2)


class _Service:
    """``python -m medfed.aggregation`` in a child process, with mutual TLS."""

    def __init__(self, state_dir: Path, kit_dir: Path, site_count: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.state_dir = state_dir
        self.kit_dir = kit_dir
        self.concurrency = str(max(256, 2 * site_count + 64))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True)
        command = [
            sys.executable, "-m", "medfed.aggregation",
            "--port", str(self.port),
            "--state-dir", str(self.state_dir),
            "--kit-dir", str(self.kit_dir),
            "--max-concurrency", self.concurrency,
        ]  # fmt: skip
        self.log = (self.state_dir / "service.log").open("wb")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT
        )
        context = ssl.create_default_context(
            cafile=str(self.kit_dir / KitFiles.CA_CERT)
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}")
            try:
                if httpx.get(
                    f"{self.url}/health", verify=context, timeout=2
                ).is_success:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("service did not answer /health within 120 s")

    def rss_bytes(self, field: str = "VmRSS") -> int:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not found in /proc/{self.process.pid}/status")

    def peak_rss_bytes(self) -> int:
        return self.rss_bytes("VmHWM")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def _summary(
    report: dict[str, Any], site_count: int, malformed_count: int
) -> dict[str, Any]:
    uploads = report["uploads"]
    malformed = report["malformed"]
    return {
        "sites": site_count,
        "uploads_accepted": uploads["statuses"].get("200", 0),
        "all_uploads_accepted": uploads["statuses"] == {"200": site_count},
        "upload_wall_seconds": round(uploads["wall_seconds"], 2),
        "upload_latency_p95_seconds": round(uploads["latency_seconds"]["p95"], 2),
        "malformed_requests": malformed_count,
        "malformed_rejected_4xx": malformed["status_classes"].get("4xx", 0),
        "all_malformed_rejected": malformed["status_classes"]
        == {"4xx": malformed_count},
        "round_1_uploads_after_malformed": malformed["round_1_uploads_after"],
        "health_probes": report["health"]["probes"],
        "health_failures": report["health"]["failures"],
        "round_finalized_with": report["finalize"]["uploaded"],
        "audit_log_ok": report["audit"]["ok"],
        "peak_rss_mib": round(report["peak_rss_bytes"] / 2**20, 1),
        "baseline_rss_mib": round(report["baseline_rss_bytes"] / 2**20, 1),
    }


if __name__ == "__main__":
    main()
