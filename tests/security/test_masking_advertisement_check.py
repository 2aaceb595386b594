"""The aggregation service checks key advertisements against its site registry.

Four sites with kits from ``medfed provision`` run a masking round over
mutual TLS. Site delta's kit is misconfigured: its advertisement is signed
with another site's key, or not signed at all. The service must reject it
at ``POST /keys`` with a message naming delta and its kit, delta must
withdraw, and the other three sites must finish the round without it. If
the service relayed delta's advertisement, every honest site would reject
the roster and the round would abort for all of them.
"""

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.audit import verify
from medfed.aggregation.service import ServiceSettings, create_app
from medfed.contract.kits import KitFiles, site_kit_name
from medfed.contract.secagg import MaskingSite, RingEncoding
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.signing import (
    Ed25519Signer,
    load_private_key,
    load_site_registry,
)
from medfed.errors import ServiceError
from medfed.provision import provision
from medfed.sites.client import AggregationClient
from medfed.sites.secagg_client import BackgroundMaskingRound, MaskingClient

from .conftest import study_config_text
from .federation import client
from .processes import ServiceProcess
from .servers import serve
from .test_masking_restart import wait_for_messages

SITES = ["alpha", "beta", "gamma", "delta"]
HONEST = ["alpha", "beta", "gamma"]
BAD = "delta"
SECURE = SecureAggregationConfig(mode="masking", fractional_bits=16, max_weight=100)
# Four sites give a threshold of 3, so the round can go on without delta.
ENCODING = SECURE.encoding(len(SITES))
INITIAL = {
    "linear.weight": np.zeros((1, 4), np.float32),
    "linear.bias": np.zeros(1, np.float32),
}
SAMPLE_COUNT = 10
WAIT_SECONDS = 120
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    config = tmp_path_factory.mktemp("config") / "quartet.yaml"
    sites = ", ".join(f"{{id: {name}}}" for name in SITES)
    config.write_text(
        study_config_text(study="quartet", sites=f"[{sites}]"), encoding="utf-8"
    )
    return provision(config, tmp_path_factory.mktemp("kits") / "out")


@pytest.fixture(scope="module")
def service(kits, tmp_path_factory) -> Iterator[dict]:
    state_dir = tmp_path_factory.mktemp("state")
    app = create_app(ServiceSettings(state_dir=state_dir, kit_dir=kits["aggregation"]))
    with serve(app, **app.state.security.uvicorn_options()) as url:
        yield {"url": url, "state_dir": state_dir}


def create_masking_study(
    url: str, kits: dict[str, Path], sites: list[str] = SITES
) -> str:
    """Create a masking study of ``sites`` and open its round 0; return its name."""
    study = f"quartet-{next(_study_numbers)}"
    settings = {
        "sites": sites,
        "strategy": "fedavg",
        "secure_aggregation": SECURE.model_dump(mode="json"),
    }
    body = save_safetensors(
        INITIAL, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    with AggregationClient.with_kit(url, kits["coordinator"]) as coordinator:
        coordinator.create_study(study, body)
        coordinator.open_round(study, 0, sites=sites, quorum=2, deadline_seconds=600)
    return study


def protocol_site(
    kits: dict[str, Path],
    study: str,
    name: str,
    signing: str = "own key",
    encoding: RingEncoding = ENCODING,
) -> MaskingSite:
    """Return ``name``'s protocol state, signed with the key ``signing`` names.

    ``signing`` is "own key" (the kit's signing.key), "alpha's key" (a kit
    with another site's key) or "unsigned".
    """
    kit = kits[site_kit_name(name)]
    signing_key = None
    if signing == "own key":
        signing_key = load_private_key(kit / KitFiles.SIGNING_KEY)
    elif signing == "alpha's key":
        signing_key = load_private_key(
            kits[site_kit_name("alpha")] / KitFiles.SIGNING_KEY
        )
    return MaskingSite(
        site=name,
        study=study,
        round_number=0,
        encoding=encoding,
        signing_key=signing_key,
        peer_verify_keys=load_site_registry(kit / KitFiles.SITE_REGISTRY),
    )


def site_delta(name: str) -> dict[str, np.ndarray]:
    # Within the default clip of 1.0, so the mean is exact up to rounding.
    index = SITES.index(name)
    return {
        "linear.weight": np.full((1, 4), 0.25 * (index + 1), np.float32),
        "linear.bias": np.full(1, -0.25 * (index + 1), np.float32),
    }


def finish(url, kits, study, masking, name, errors) -> None:
    """Upload ``name``'s signed masked update and reveal its shares."""
    kit = kits[site_kit_name(name)]
    signer = Ed25519Signer.from_file(kit / KitFiles.SIGNING_KEY)
    with AggregationClient.with_kit(url, kit) as site:
        try:
            masking.finish(
                site_delta(name),
                sample_count=SAMPLE_COUNT,
                upload=lambda envelope: site.upload(study, 0, name, envelope),
                signer=signer,
            )
        except Exception as error:  # reported by the test's assert
            errors[name] = error


def finish_honest_sites(url, kits, study, rounds) -> dict[str, Exception]:
    """Finish the honest sites' rounds in parallel; return their errors."""
    errors: dict[str, Exception] = {}
    threads = [
        threading.Thread(
            target=finish, args=(url, kits, study, rounds[name], name, errors)
        )
        for name in HONEST
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_SECONDS)
    return errors


def audit_entries(state_dir: Path, study: str) -> list[dict]:
    log = state_dir / "audit.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [entry for entry in entries if entry["details"].get("study") == study]


def assert_mean_of_honest_sites(model) -> None:
    """FedAvg of the honest deltas with equal sample counts, from zero weights."""
    bound = ENCODING.error_bound(len(HONEST)) / (SAMPLE_COUNT * len(HONEST)) + 1e-7
    np.testing.assert_allclose(model.weights["linear.weight"], 0.5, atol=bound)
    np.testing.assert_allclose(model.weights["linear.bias"], -0.5, atol=bound)


@pytest.mark.parametrize(
    ("signing", "reason"),
    [
        ("alpha's key", "key advertisement of site 'delta' has an invalid signature"),
        ("unsigned", "key advertisement of site 'delta' is not signed"),
    ],
)
def test_bad_advertisement_rejected(service, kits, signing, reason) -> None:
    url = service["url"]
    study = create_masking_study(url, kits)
    rounds = {}
    for name in SITES:
        rounds[name] = BackgroundMaskingRound(
            MaskingClient(
                url,
                poll_interval=0.05,
                http_client=client(url, kits[site_kit_name(name)]),
            ),
            protocol_site(kits, study, name, signing if name == BAD else "own key"),
            wait_seconds=WAIT_SECONDS,
        )
    try:
        errors = finish_honest_sites(url, kits, study, rounds)
        with pytest.raises(ServiceError) as rejected:
            rounds[BAD].finish(site_delta(BAD), sample_count=SAMPLE_COUNT)
        with AggregationClient.with_kit(url, kits["coordinator"]) as coordinator:
            status = coordinator.finalize(study, 0, absent=[BAD])
            model = coordinator.download_model(study)
    finally:
        for masking in rounds.values():
            masking.close()

    message = str(rejected.value)
    assert rejected.value.status_code == 409
    assert f"/v1/studies/{study}/rounds/0/secagg/keys" in message
    assert reason in message
    assert (
        "Check the startup kit of site 'delta': its signing.key must be the key "
        "that the aggregation service's site-registry.json lists for the site"
    ) in message
    assert errors == {}
    assert status["state"] == "finalized"
    assert sorted(status["uploaded"]) == sorted(HONEST)
    assert_mean_of_honest_sites(model)
    entries = audit_entries(service["state_dir"], study)
    rejections = [e for e in entries if e["event"] == "advertisement.rejected"]
    assert len(rejections) == 1
    assert rejections[0]["actor"] == BAD
    assert rejections[0]["details"]["status"] == 409
    assert reason in rejections[0]["details"]["reason"]
    withdrawals = [
        (e["actor"], e["details"]) for e in entries if e["event"] == "site.withdrawn"
    ]
    assert withdrawals == [
        (BAD, {"study": study, "round": 0, "site": BAD, "phase": "advertising"})
    ]
    assert verify(service["state_dir"] / "audit.jsonl").ok


def test_three_site_round_aborts_at_once(service, kits) -> None:
    url = service["url"]
    sites = ["alpha", "beta", BAD]
    study = create_masking_study(url, kits, sites)
    rounds = {}
    for name in sites:
        rounds[name] = BackgroundMaskingRound(
            MaskingClient(
                url,
                poll_interval=0.05,
                http_client=client(url, kits[site_kit_name(name)]),
            ),
            protocol_site(
                kits,
                study,
                name,
                "unsigned" if name == BAD else "own key",
                SECURE.encoding(len(sites)),
            ),
            wait_seconds=WAIT_SECONDS,
        )
    errors: dict[str, Exception] = {}
    try:
        for name in sites:
            try:
                rounds[name].finish(site_delta(name), sample_count=SAMPLE_COUNT)
            except ServiceError as error:
                errors[name] = error
    finally:
        for masking in rounds.values():
            masking.close()

    assert sorted(errors) == sorted(sites)
    assert "key advertisement of site 'delta' is not signed" in str(errors[BAD])
    # Two sites meet the threshold of 2 but not the 3 sites a roster needs,
    # so the round is aborted when delta withdraws, not at its deadline.
    for name in ("alpha", "beta"):
        message = str(errors[name])
        assert "was aborted: after site 'delta' withdrew" in message, name
        assert "fewer than the 3 sites a roster needs" in message, name


def test_restored_round_rejects_bad_advertisement(kits, tmp_path) -> None:
    service = ServiceProcess(tmp_path, kits["aggregation"]).start()
    clients = {
        name: MaskingClient(
            service.url,
            poll_interval=0.05,
            http_client=client(service.url, kits[site_kit_name(name)]),
        )
        for name in SITES
    }
    rounds: dict[str, BackgroundMaskingRound] = {}
    try:
        study = create_masking_study(service.url, kits)
        for name in HONEST:
            rounds[name] = BackgroundMaskingRound(
                clients[name],
                protocol_site(kits, study, name),
                wait_seconds=WAIT_SECONDS,
            )
        # The honest sites have advertised and wait for the roster, whose
        # advertisements the restarted service restores from its store.
        wait_for_messages(tmp_path, "advertisement", len(HONEST))
        service.kill()
        time.sleep(0.5)
        service.start()
        with pytest.raises(ServiceError) as rejected:
            clients[BAD].set_up(
                protocol_site(kits, study, BAD, "alpha's key"),
                wait_seconds=WAIT_SECONDS,
            )
        errors = finish_honest_sites(service.url, kits, study, rounds)
        with AggregationClient.with_kit(
            service.url, kits["coordinator"]
        ) as coordinator:
            status = coordinator.finalize(study, 0, absent=[BAD])
            model = coordinator.download_model(study)
    finally:
        for masking in rounds.values():
            masking.close()
        clients[BAD].close()
        service.stop()

    assert rejected.value.status_code == 409
    assert "key advertisement of site 'delta' has an invalid signature" in str(
        rejected.value
    )
    assert errors == {}
    assert status["state"] == "finalized"
    assert sorted(status["uploaded"]) == sorted(HONEST)
    assert_mean_of_honest_sites(model)
    events = [entry["event"] for entry in audit_entries(tmp_path, study)]
    assert events.count("advertisement.rejected") == 1
    assert verify(tmp_path / "audit.jsonl").ok
