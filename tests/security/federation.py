"""Helpers that drive the aggregation service as a coordinator and sites would."""

import json
from collections.abc import Iterable
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save as save_safetensors

from medfed.contract.kits import KitFiles, client_ssl_context, site_kit_name
from medfed.contract.signing import Ed25519Signer
from medfed.contract.wire import encode_envelope

STUDY = "heart"


def initial_model(sites: Iterable[str]) -> tuple[dict[str, np.ndarray], bytes]:
    """Return a small model's weights and the body that creates the study."""
    weights = {
        "linear.weight": np.linspace(-1, 1, 15, dtype=np.float32).reshape(1, 15),
        "linear.bias": np.zeros(1, np.float32),
    }
    settings = {"sites": list(sites), "strategy": "fedavg", "strategy_params": {}}
    body = save_safetensors(
        weights, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    return weights, body


def site_delta(site: str, round_number: int) -> dict[str, np.ndarray]:
    """Return a deterministic update delta for ``site`` in ``round_number``."""
    seed = sum(site.encode()) * 1000 + round_number
    generator = np.random.default_rng(seed)
    return {
        "linear.weight": generator.normal(0, 0.1, (1, 15)).astype(np.float32),
        "linear.bias": generator.normal(0, 0.1, (1,)).astype(np.float32),
    }


def signed_envelope(
    kits: dict[str, Path], site: str, round_number: int, **options
) -> bytes:
    """Encode and sign ``site``'s delta for ``round_number`` with the site's key."""
    signer = Ed25519Signer.from_file(kits[site_kit_name(site)] / KitFiles.SIGNING_KEY)
    arguments = {
        "study": STUDY,
        "round_number": round_number,
        "site": site,
        "sample_count": 10 + sum(site.encode()) % 50,
        "nonce": f"{round_number:08x}{sum(site.encode()):08x}",
        "signer": signer,
        **options,
    }
    return encode_envelope(site_delta(site, round_number), **arguments)


def client(url: str, kit: Path, **options) -> httpx.Client:
    """An HTTPS client presenting ``kit``'s certificate and trusting the study CA."""
    return httpx.Client(
        base_url=url, verify=client_ssl_context(kit), timeout=60, **options
    )


def upload_path(round_number: int, site: str, study: str = STUDY) -> str:
    return f"/v1/studies/{study}/rounds/{round_number}/updates/{site}"
