"""Who may withdraw a site from a masking round, over real mutual TLS.

A site may withdraw only itself. The coordinator may withdraw any site that
has not uploaded, for a site that died before it could withdraw itself.
"""

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.audit import verify
from medfed.aggregation.service import ServiceSettings, create_app
from medfed.contract.kits import KitFiles, site_kit_name
from medfed.contract.secagg import MaskingSite
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.signing import Ed25519Signer, load_private_key
from medfed.provision import provision
from medfed.sites.client import AggregationClient
from medfed.sites.secagg_client import BackgroundMaskingRound, MaskingClient

from .conftest import study_config_text
from .federation import client
from .servers import serve

SITES = ["alpha", "beta", "gamma"]
SECURE = SecureAggregationConfig(mode="masking", fractional_bits=16, max_weight=100)
INITIAL = {
    "linear.weight": np.zeros((1, 4), np.float32),
    "linear.bias": np.zeros(1, np.float32),
}
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Kits of a three-site study, the fewest sites a masking round takes."""
    config = tmp_path_factory.mktemp("config") / "trio.yaml"
    config.write_text(
        study_config_text(study="trio", sites="[{id: alpha}, {id: beta}, {id: gamma}]"),
        encoding="utf-8",
    )
    return provision(config, tmp_path_factory.mktemp("kits") / "out")


@pytest.fixture(scope="module")
def service(kits, tmp_path_factory) -> Iterator[dict]:
    state_dir = tmp_path_factory.mktemp("state")
    app = create_app(ServiceSettings(state_dir=state_dir, kit_dir=kits["aggregation"]))
    with serve(app, **app.state.security.uvicorn_options()) as url:
        yield {"url": url, "state_dir": state_dir, "app": app}


def open_masking_round(service, kits) -> str:
    """Create a masking study and open its round 0; return the study's name."""
    study = f"trio-{next(_study_numbers)}"
    settings = {
        "sites": SITES,
        "strategy": "fedavg",
        "secure_aggregation": SECURE.model_dump(mode="json"),
    }
    body = save_safetensors(
        INITIAL, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    with AggregationClient.with_kit(service["url"], kits["coordinator"]) as coordinator:
        coordinator.create_study(study, body)
        coordinator.open_round(study, 0, sites=SITES, quorum=2, deadline_seconds=600)
    return study


def set_up_keys(service, kits, study) -> dict[str, BackgroundMaskingRound]:
    """Exchange every site's keys; return each site's round, ready to upload."""
    rounds = {}
    for name in SITES:
        http = client(service["url"], kits[site_kit_name(name)])
        rounds[name] = BackgroundMaskingRound(
            MaskingClient(service["url"], poll_interval=0.05, http_client=http),
            MaskingSite(
                site=name,
                study=study,
                round_number=0,
                encoding=SECURE.encoding(3),
                signing_key=load_private_key(
                    kits[site_kit_name(name)] / KitFiles.SIGNING_KEY
                ),
            ),
            wait_seconds=30,
        )
    with client(service["url"], kits["site-alpha"]) as alpha:
        relayed = alpha.get(
            f"/v1/studies/{study}/rounds/0/secagg/shares/alpha", params={"wait": 20}
        )
    assert relayed.status_code == 200, relayed.text
    return rounds


def masking_state(service, study) -> dict:
    with service["app"].state.service.masking.edit(study, 0) as entry:
        return entry.server.export_state()


def audit_entries(service) -> list[dict]:
    log = service["state_dir"] / "audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def site_delta(index: int) -> dict[str, np.ndarray]:
    return {
        "linear.weight": np.full((1, 4), 0.25 * (index + 1), np.float32),
        "linear.bias": np.full(1, -0.5 * (index + 1), np.float32),
    }


def finish(service, kits, study, rounds, name, errors) -> None:
    """Upload ``name``'s signed masked update and reveal its shares."""
    kit = kits[site_kit_name(name)]
    signer = Ed25519Signer.from_file(kit / KitFiles.SIGNING_KEY)
    with AggregationClient.with_kit(service["url"], kit) as site:
        try:
            rounds[name].finish(
                site_delta(SITES.index(name)),
                sample_count=10,
                upload=lambda envelope: site.upload(study, 0, name, envelope),
                signer=signer,
            )
        except Exception as error:  # reported by the test's assert
            errors[name] = error


def close_all(rounds: dict[str, BackgroundMaskingRound]) -> None:
    for masking in rounds.values():
        masking.close()


def test_other_site_cannot_withdraw(service, kits) -> None:
    study = open_masking_round(service, kits)
    rounds = set_up_keys(service, kits, study)
    try:
        before = masking_state(service, study)
        with client(service["url"], kits["site-beta"]) as beta:
            response = beta.post(
                f"/v1/studies/{study}/rounds/0/secagg/withdrawals/gamma"
            )
        after = masking_state(service, study)
    finally:
        close_all(rounds)

    assert response.status_code == 403
    assert response.json()["detail"] == (
        "site 'beta' may not withdraw site 'gamma'; only that site or the "
        "coordinator may"
    )
    assert after == before
    assert after["withdrawn"] == []


def test_site_cannot_claim_coordinator(service, kits) -> None:
    study = open_masking_round(service, kits)
    rounds = set_up_keys(service, kits, study)
    try:
        before = masking_state(service, study)
        with client(service["url"], kits["site-beta"]) as beta:
            response = beta.post(
                f"/v1/studies/{study}/rounds/0/secagg/withdrawals/gamma",
                json={"requested_by": "coordinator"},
            )
        after = masking_state(service, study)
    finally:
        close_all(rounds)

    assert response.status_code == 403
    assert response.json()["detail"] == (
        "site 'beta' sent a withdrawal with requested_by 'coordinator'; set "
        "requested_by to 'site'"
    )
    assert after == before


def test_coordinator_withdraws_dead_site(service, kits) -> None:
    study = open_masking_round(service, kits)
    rounds = set_up_keys(service, kits, study)
    errors: dict[str, Exception] = {}
    try:
        # gamma shared its keys and then died without withdrawing.
        with AggregationClient.with_kit(
            service["url"], kits["coordinator"]
        ) as coordinator:
            withdrawn = coordinator.withdraw_site(study, 0, "gamma")
            threads = [
                threading.Thread(
                    target=finish, args=(service, kits, study, rounds, name, errors)
                )
                for name in ("alpha", "beta")
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            status = coordinator.finalize(study, 0, absent=["gamma"])
            model = coordinator.download_model(study)
    finally:
        close_all(rounds)

    assert withdrawn is True
    assert errors == {}
    assert status["state"] == "finalized"
    assert sorted(status["uploaded"]) == ["alpha", "beta"]
    # FedAvg of alpha's and beta's deltas with equal sample counts.
    bound = SECURE.encoding(3).error_bound(2) / 20 + 1e-7
    np.testing.assert_allclose(model.weights["linear.weight"], 0.375, atol=bound)
    np.testing.assert_allclose(model.weights["linear.bias"], -0.75, atol=bound)
    withdrawals = [
        (entry["actor"], entry["details"])
        for entry in audit_entries(service)
        if entry["event"] == "site.withdrawn" and entry["details"]["study"] == study
    ]
    assert withdrawals == [
        (
            "coordinator",
            {"study": study, "round": 0, "site": "gamma", "phase": "uploading"},
        )
    ]
    assert verify(service["state_dir"] / "audit.jsonl").ok
