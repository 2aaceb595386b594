"""Signed masking key advertisements over real mutual TLS.

Three heart-disease sites with kits from ``medfed provision`` run masking
rounds through ``SiteRunner`` against the aggregation service on 127.0.0.1.
An ASGI middleware that this test wraps around the service acts as a
malicious aggregation service. It swaps one site's public keys in the
roster that the sites download. The honest sites must then reject the
roster and share no keys, so the service can unmask nothing.
"""

import json
import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.aggregation.service import ServiceSettings, create_app
from medfed.contract.config import StudyConfig, parse_study_config
from medfed.contract.kits import KitFiles, site_kit_name
from medfed.contract.secagg import FixedPointEncoding, KeyAdvertisement, MaskingSite
from medfed.contract.secagg.keys import RoundContext
from medfed.contract.secagg.signing import verify_advertisement
from medfed.contract.signing import (
    Ed25519Signer,
    load_site_registry,
    public_key_to_base64,
)
from medfed.errors import ConfigError, SecureAggregationError
from medfed.provision import provision
from medfed.sites.advertisement_keys import load_advertisement_keys
from medfed.sites.client import AggregationClient
from medfed.sites.runner import (
    SiteRunner,
    initial_model_weights,
    weights_to_safetensors,
)
from tests.conftest import CONFIGS

from .federation import client
from .servers import serve

SITES = ("cleveland", "hungary", "switzerland")
VICTIM = "switzerland"
# Any encoding serves for a forged advertisement, which carries keys only.
FORGED_ENCODING = FixedPointEncoding(
    fractional_bits=8, clip=1.0, max_weight=10, site_count=3
)


class KeySwappingService:
    """ASGI middleware that acts as a service swapping a site's roster keys.

    With ``victim`` set, every roster the service sends carries other X25519
    public keys for ``victim``, signed with an Ed25519 key that the service
    made up. It records every roster it sends and counts share uploads.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.victim: str | None = None
        self.rosters: list[dict[str, Any]] = []
        self.share_uploads = 0
        self._forged: dict[str, KeyAdvertisement] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if method == "POST" and path.endswith("/secagg/shares"):
            self.share_uploads += 1
        if method != "GET" or not path.endswith("/secagg/roster"):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = b""

        async def rewrite(message: dict[str, Any]) -> None:
            nonlocal body
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            if start["status"] == 200:
                body = self._tampered(body)
            headers = [
                (name, value)
                for name, value in start["headers"]
                if name.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)

    def _tampered(self, body: bytes) -> bytes:
        roster = json.loads(body)
        if self.victim is not None:
            forged = self._forgery(roster["study"], roster["round"])
            roster["advertisements"] = [
                forged.model_dump(mode="json") if item["site"] == self.victim else item
                for item in roster["advertisements"]
            ]
        self.rosters.append(roster)
        return json.dumps(roster).encode()

    def _forgery(self, study: str, round_number: int) -> KeyAdvertisement:
        # One forged advertisement per round, as a consistent attacker sends.
        key = f"{study}/{round_number}"
        if key not in self._forged:
            assert self.victim is not None
            self._forged[key] = MaskingSite(
                site=self.victim,
                study=study,
                round_number=round_number,
                encoding=FORGED_ENCODING,
                signing_key=Ed25519PrivateKey.generate(),
            ).advertise()
        return self._forged[key]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, dict]:
    raw = yaml.safe_load((CONFIGS / "heart_disease_nodp.yaml").read_text())
    raw["study"] = "heart-signed"
    raw["sites"] = [site for site in raw["sites"] if site["id"] in SITES]
    raw["training"].update(rounds=1, local_epochs=1)
    raw["secure_aggregation"] = {"mode": "masking"}
    raw["round"] = {"deadline_seconds": 120}
    folder = tmp_path_factory.mktemp("signed-kits")
    (folder / "study.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    kits = provision(folder / "study.yaml", folder / "out")
    return parse_study_config(raw), kits


@pytest.fixture
def service(
    study, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, KeySwappingService]]:
    config, kits = study
    app = create_app(
        ServiceSettings(
            state_dir=tmp_path_factory.mktemp("state"), kit_dir=kits["aggregation"]
        )
    )
    middleware = KeySwappingService(app)
    settings = {
        "sites": list(SITES),
        "strategy": "fedavg",
        "strategy_params": {},
        "secure_aggregation": config.secure_aggregation.model_dump(mode="json"),
    }
    body = weights_to_safetensors(
        initial_model_weights(config),
        metadata={"medfed_study_settings": json.dumps(settings)},
    )
    with serve(middleware, **app.state.security.uvicorn_options()) as url:
        with client(url, kits["coordinator"]) as coordinator:
            created = coordinator.post(f"/v1/studies/{config.study}", content=body)
            assert created.status_code == 201, created.text
        yield url, middleware


def run_round(
    study, url: str, round_number: int, tmp_path: Path, data_root: Path
) -> dict[str, Any]:
    """Open a round for every site and train them in parallel.

    Returns:
        Each site's ``SiteRoundReport``, or the ``SecureAggregationError`` its
        round raised.
    """
    config, kits = study
    with AggregationClient.with_kit(url, kits["coordinator"]) as coordinator:
        coordinator.open_round(
            config.study,
            round_number,
            sites=list(SITES),
            quorum=2,
            deadline_seconds=120,
        )

    def train(site: str) -> Any:
        kit = kits[site_kit_name(site)]
        runner = SiteRunner(
            config,
            site,
            tmp_path / site,
            data_root,
            signer=Ed25519Signer.from_file(kit / KitFiles.SIGNING_KEY),
            kit_dir=kit,
        )
        with AggregationClient.with_kit(url, kit) as http:
            try:
                return runner.train_round(http, round_number)
            except SecureAggregationError as error:
                return error

    with ThreadPoolExecutor(len(SITES)) as pool:
        return dict(zip(SITES, pool.map(train, SITES), strict=True))


def finalize(study, url: str, round_number: int, **body: Any) -> dict[str, Any]:
    config, kits = study
    with AggregationClient.with_kit(url, kits["coordinator"]) as coordinator:
        return coordinator.finalize(config.study, round_number, **body)


def test_signed_round_finalizes(study, service, tmp_path, data_root) -> None:
    config, kits = study
    url, middleware = service

    outcomes = run_round(study, url, 0, tmp_path, data_root)
    status = finalize(study, url, 0)

    for site, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), f"{site}: {outcome}"
        assert outcome.status == "uploaded", site
    assert status["state"] == "finalized"
    assert sorted(status["uploaded"]) == list(SITES)
    registry = load_site_registry(kits["aggregation"] / KitFiles.SITE_REGISTRY)
    assert len(middleware.rosters) == len(SITES)
    for roster in middleware.rosters:
        assert [item["site"] for item in roster["advertisements"]] == list(SITES)
        for item in roster["advertisements"]:
            advertisement = KeyAdvertisement.model_validate(item)
            assert advertisement.signature is not None, item["site"]
            # Raises if the service altered the signed bytes.
            verify_advertisement(
                advertisement,
                registry[advertisement.site],
                RoundContext(config.study, 0),
            )


def test_swapped_key_rejected_by_sites(
    study, service, tmp_path, data_root, caplog
) -> None:
    config, _ = study
    url, middleware = service
    middleware.victim = VICTIM
    caplog.set_level(logging.WARNING, logger="medfed.sites.secagg_client")

    outcomes = run_round(study, url, 0, tmp_path, data_root)
    with client(url, study[1]["coordinator"]) as coordinator:
        # The sites withdrew below the threshold, so the masking round was aborted.
        roster = coordinator.get(f"/v1/studies/{config.study}/rounds/0/secagg/roster")
    status = finalize(study, url, 0, absent=list(SITES))
    with AggregationClient.with_kit(url, study[1]["coordinator"]) as coordinator:
        model = coordinator.download_model(config.study)

    for site in SITES:
        assert isinstance(outcomes[site], SecureAggregationError), site
    for site in ("cleveland", "hungary"):
        message = str(outcomes[site])
        assert f"site {site!r} rejected the roster of round 0" in message
        assert f"key advertisement of site {VICTIM!r} has an invalid signature" in (
            message
        )
        assert "the aggregation service may be tampering" in message
    assert str(outcomes[VICTIM]).startswith(
        f"roster carries keys for site {VICTIM!r} that are not its own"
    )
    assert len(middleware.rosters) == len(SITES)
    assert middleware.share_uploads == 0
    assert roster.status_code == 409
    assert "was aborted" in roster.json()["detail"]
    assert "withdrew" in roster.json()["detail"]
    for site in SITES:
        assert f"site {site} rejected the roster of masking round 0 and withdraws" in (
            caplog.text
        )
    for item in middleware.rosters[0]["advertisements"]:
        assert item["mask_public_key"] not in caplog.text
        assert item["signature"] not in caplog.text
    assert status["state"] == "aborted"
    assert status["uploaded"] == []
    assert model.version == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no registry", "has no site-registry.json"),
        ("other study", "is for study 'heart-signed', not 'other-study'"),
        ("other site", "has no key for site 'long-beach'"),
        ("other signing key", "lists another key for site 'cleveland'"),
    ],
)
def test_kit_keys_checked(study, tmp_path, change, message) -> None:
    _, kits = study
    kit = tmp_path / "kit"
    shutil.copytree(kits[site_kit_name("cleveland")], kit)
    study_id, site = "heart-signed", "cleveland"
    if change == "no registry":
        (kit / KitFiles.SITE_REGISTRY).unlink()
    elif change == "other study":
        study_id = "other-study"
    elif change == "other site":
        site = "long-beach"
    else:
        shutil.copy(kits[site_kit_name("hungary")] / KitFiles.SIGNING_KEY, kit)

    with pytest.raises(ConfigError) as error:
        load_advertisement_keys(kit, study=study_id, site=site)

    assert message in str(error.value)


def test_kit_keys_match_registry(study) -> None:
    _, kits = study
    keys = load_advertisement_keys(
        kits[site_kit_name("hungary")], study="heart-signed", site="hungary"
    )

    assert sorted(keys.verify_keys) == sorted(SITES)
    assert public_key_to_base64(keys.verify_keys["hungary"]) == (
        public_key_to_base64(keys.signing_key.public_key())
    )
