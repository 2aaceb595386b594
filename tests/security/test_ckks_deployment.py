"""A CKKS round over real mutual TLS, with keys from ``medfed provision``.

Sites read the secret context from their startup kits, sign their encrypted
uploads and the decrypted sum, and the service accepts each only from the
site that its client certificate names.
"""

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save as save_safetensors

pytest.importorskip("tenseal")

from medfed.aggregation.service import ServiceSettings, create_app
from medfed.contract.codecs.ckks import CkksEncryptor
from medfed.contract.config import StudyConfig, parse_study_config
from medfed.contract.kits import KitFiles, site_kit_name
from medfed.contract.signing import Ed25519Signer
from medfed.contract.wire import encode_envelope
from medfed.provision import provision
from medfed.sites.ckks_keys import load_secret_context
from medfed.sites.client import AggregationClient
from medfed.sites.runner import KIT_ENV_VAR, SiteRunner

from .conftest import study_config_text
from .federation import STUDY, client, initial_model, site_delta
from .servers import serve

SITES = ("alpha", "beta", "gamma")
COUNTS = {"alpha": 30, "beta": 50, "gamma": 20}
SECURE = "{mode: ckks, max_weight: 1000}"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, dict]:
    folder = tmp_path_factory.mktemp("ckks-kits")
    text = study_config_text(
        sites="[{id: alpha}, {id: beta}, {id: gamma}]", secure_aggregation=SECURE
    )
    (folder / "study.yaml").write_text(text, encoding="utf-8")
    kits = provision(folder / "study.yaml", folder / "out")
    return parse_study_config(yaml.safe_load(text)), kits


@pytest.fixture(scope="module")
def service(study, tmp_path_factory) -> Iterator[str]:
    config, kits = study
    app = create_app(
        ServiceSettings(
            state_dir=tmp_path_factory.mktemp("state"), kit_dir=kits["aggregation"]
        )
    )
    weights, _ = initial_model(SITES)
    settings = {
        "sites": list(SITES),
        "strategy": "fedavg",
        "secure_aggregation": config.secure_aggregation.model_dump(mode="json"),
    }
    body = save_safetensors(
        weights, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    with serve(app, **app.state.security.uvicorn_options()) as url:
        with client(url, kits["coordinator"]) as coordinator:
            assert coordinator.post(f"/v1/studies/{STUDY}", content=body).is_success
            opened = coordinator.post(
                f"/v1/studies/{STUDY}/rounds/0",
                json={"sites": list(SITES), "quorum": 2, "deadline_seconds": 600},
            )
            assert opened.status_code == 200, opened.text
        yield url


def encrypted_upload(config: StudyConfig, kits: dict, site: str) -> bytes:
    kit = kits[site_kit_name(site)]
    context = load_secret_context(config, Path("unused"), kit)
    return encode_envelope(
        site_delta(site, 0),
        study=STUDY,
        round_number=0,
        site=site,
        sample_count=COUNTS[site],
        nonce=secrets.token_hex(16),
        signer=Ed25519Signer.from_file(kit / KitFiles.SIGNING_KEY),
        codec=CkksEncryptor(context, sample_count=COUNTS[site], clip=1.0),
    )


def test_ckks_round_with_kits(
    study, service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, kits = study
    for site in ("alpha", "beta"):
        with client(service, kits[site_kit_name(site)]) as http:
            response = http.put(
                f"/v1/studies/{STUDY}/rounds/0/updates/{site}",
                content=encrypted_upload(config, kits, site),
            )
            assert response.status_code == 200, response.text
    with client(service, kits["coordinator"]) as coordinator:
        closing = coordinator.post(
            f"/v1/studies/{STUDY}/rounds/0/finalize", json={"absent": ["gamma"]}
        ).json()
    with client(service, kits[site_kit_name("alpha")]) as alpha:
        tensors = {
            "linear.weight": np.zeros((1, 15), np.float32),
            "linear.bias": np.zeros(1, np.float32),
        }
        unsigned = encode_envelope(
            tensors,
            study=STUDY,
            round_number=0,
            site="alpha",
            sample_count=80,
            nonce=secrets.token_hex(16),
        )
        as_other = alpha.put(
            f"/v1/studies/{STUDY}/rounds/0/ckks/decrypted/beta", content=unsigned
        )
        not_signed = alpha.put(
            f"/v1/studies/{STUDY}/rounds/0/ckks/decrypted/alpha", content=unsigned
        )

    beta_kit = kits[site_kit_name("beta")]
    monkeypatch.setenv(KIT_ENV_VAR, str(beta_kit))
    runner = SiteRunner(
        config,
        "beta",
        tmp_path,
        data_root=tmp_path,
        signer=Ed25519Signer.from_file(beta_kit / KitFiles.SIGNING_KEY),
    )
    with AggregationClient.with_kit(service, beta_kit) as beta:
        report = runner.decrypt_sum(beta, 0)
    with client(service, kits["coordinator"]) as coordinator:
        final = coordinator.post(
            f"/v1/studies/{STUDY}/rounds/0/finalize", json={}
        ).json()
        model = AggregationClient(service, http_client=coordinator).download_model(
            STUDY
        )

    assert closing["ckks"]["phase"] == "decrypting"
    assert closing["ckks"]["contributors"] == ["alpha", "beta"]
    assert as_other.status_code == 403
    assert (
        "client certificate is for site 'alpha' but the request is for site 'beta'"
        in (as_other.text)
    )
    assert not_signed.status_code == 403
    assert "envelope from site 'alpha' is unsigned" in not_signed.text
    assert report["contributors"] == ["alpha", "beta"]
    assert report["sample_count"] == 80
    assert final["state"] == "finalized"
    initial, _ = initial_model(SITES)
    for name, value in initial.items():
        mean = sum(
            site_delta(site, 0)[name] * COUNTS[site] for site in ("alpha", "beta")
        )
        np.testing.assert_allclose(model.weights[name], value + mean / 80, atol=1e-5)
