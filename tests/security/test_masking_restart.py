"""Killing the aggregation service mid-way through a masking round loses nothing.

The service runs as its own process over mutual TLS. Sites alpha and beta
use ``MaskingClient``, which retries while the service is down; site gamma
sends each message by hand, so the test decides when. The runs kill the
service with SIGKILL while sites advertise, while they share keys, after
two masked uploads, after gamma's reveal, and after every reveal but before
finalize. Each run restarts the service on the same state directory and
must publish the model of an uninterrupted run, bit for bit, with a valid
audit chain.
"""

import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.audit import verify
from medfed.contract.kits import KitFiles, site_kit_name
from medfed.contract.secagg import (
    EncryptedShare,
    MaskingSite,
    RevealRequest,
    parse_message,
)
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.signing import Ed25519Signer, load_private_key
from medfed.contract.wire import encode_envelope
from medfed.provision import provision
from medfed.sites.client import AggregationClient
from medfed.sites.secagg_client import MaskingClient

from .conftest import study_config_text
from .federation import STUDY, client, initial_model, site_delta
from .processes import ServiceProcess

SITES = ("alpha", "beta", "gamma")
SECURE = SecureAggregationConfig(mode="masking", fractional_bits=16, max_weight=100)
ENCODING = SECURE.encoding(len(SITES))
PREFIX = f"/v1/studies/{STUDY}/rounds/0/secagg"
WAIT_SECONDS = 120


@pytest.fixture(scope="module")
def masking_kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("masking-kits")
    text = study_config_text(sites="[{id: alpha}, {id: beta}, {id: gamma}]")
    (folder / "study.yaml").write_text(text, encoding="utf-8")
    return provision(folder / "study.yaml", folder / "out")


def sample_count(site: str) -> int:
    return 10 + sum(site.encode()) % 50


class Site:
    """One site's clients and protocol state over mutual TLS."""

    def __init__(self, url: str, kit: Path, name: str) -> None:
        self.name = name
        self.http = client(url, kit)
        self.aggregation = AggregationClient(url, http_client=self.http)
        self.masking = MaskingClient(url, http_client=self.http, poll_interval=0.05)
        # The service checks each advertisement against its site registry.
        self.protocol = MaskingSite(
            site=name,
            study=STUDY,
            round_number=0,
            encoding=ENCODING,
            signing_key=load_private_key(kit / KitFiles.SIGNING_KEY),
        )
        self.signer = Ed25519Signer.from_file(kit / KitFiles.SIGNING_KEY)
        #: The masked envelope this site sent, to send again as a retry.
        self.envelope: bytes | None = None

    def upload(self, envelope: bytes) -> dict[str, Any]:
        self.envelope = envelope
        return self.aggregation.upload(STUDY, 0, self.name, envelope)

    def close(self) -> None:
        self.http.close()


class ManualSite(Site):
    """A site that sends each masking message when the test calls its method."""

    def advertise(self) -> None:
        message = self.protocol.advertise().model_dump(mode="json")
        assert self.http.post(f"{PREFIX}/keys", json=message).status_code == 200

    def share(self) -> None:
        roster = self.http.get(f"{PREFIX}/roster", params={"wait": 30})
        assert roster.status_code == 200, roster.text
        upload = self.protocol.share_keys(roster.json()).model_dump(mode="json")
        assert self.http.post(f"{PREFIX}/shares", json=upload).status_code == 200
        shares = self.http.get(f"{PREFIX}/shares/{self.name}", params={"wait": 30})
        assert shares.status_code == 200, shares.text
        self.protocol.receive_shares(
            [parse_message(EncryptedShare, item) for item in shares.json()]
        )

    def upload_update(self) -> dict[str, Any]:
        masked = self.protocol.mask_update(
            site_delta(self.name, 0), sample_count=sample_count(self.name)
        )
        envelope = encode_envelope(
            masked,
            study=STUDY,
            round_number=0,
            site=self.name,
            sample_count=sample_count(self.name),
            nonce=f"{sum(self.name.encode()):032x}",
            codec_name="masked",
            codec_params=ENCODING.codec_params,
            signer=self.signer,
        )
        return self.upload(envelope)

    def reveal(self) -> None:
        response = self.http.get(f"{PREFIX}/reveal-request", params={"wait": 30})
        assert response.status_code == 200, response.text
        request = parse_message(RevealRequest, response.content)
        revealed = self.protocol.reveal(request).model_dump(mode="json")
        assert self.http.post(f"{PREFIX}/reveals", json=revealed).status_code == 200


def create_study(url: str, kits: dict[str, Path]) -> None:
    weights, _ = initial_model(SITES)
    settings = {
        "sites": list(SITES),
        "strategy": "fedavg",
        "secure_aggregation": SECURE.model_dump(mode="json"),
    }
    body = save_safetensors(
        weights, metadata={"medfed_study_settings": json.dumps(settings)}
    )
    with client(url, kits["coordinator"]) as coordinator:
        assert coordinator.post(f"/v1/studies/{STUDY}", content=body).status_code == 201
        opened = coordinator.post(
            f"/v1/studies/{STUDY}/rounds/0",
            json={"sites": list(SITES), "quorum": 2, "deadline_seconds": 600},
        )
        assert opened.status_code == 200, opened.text


def wait_for_messages(state_dir: Path, kind: str, count: int) -> None:
    """Wait until the service has saved ``count`` masking messages of ``kind``."""
    database = state_dir / "aggregation.sqlite3"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
            saved = connection.execute(
                "SELECT COUNT(*) FROM masking_messages WHERE kind = ?", (kind,)
            ).fetchone()[0]
        if saved >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"the service did not save {count} {kind} messages in 60 s")


def run_round(
    state_dir: Path, kits: dict[str, Path], kill_at: str | None
) -> tuple[dict[str, Any], bytes, str]:
    """Run round 0, killing and restarting the service at ``kill_at``.

    Returns the finalized round's status, the new model and its SHA-256.
    """
    service = ServiceProcess(state_dir, kits["aggregation"]).start()

    def restart() -> None:
        service.kill()
        time.sleep(0.5)
        service.start()

    create_study(service.url, kits)
    alpha, beta = (
        Site(service.url, kits[site_kit_name(name)], name) for name in ("alpha", "beta")
    )
    gamma = ManualSite(service.url, kits[site_kit_name("gamma")], "gamma")
    try:
        with ThreadPoolExecutor(2) as pool:
            set_ups = {
                site.name: pool.submit(
                    site.masking.set_up, site.protocol, wait_seconds=WAIT_SECONDS
                )
                for site in (alpha, beta)
            }
            if kill_at == "advertising":
                # alpha and beta have advertised and wait for the roster.
                wait_for_messages(state_dir, "advertisement", 2)
                restart()
            gamma.advertise()
            if kill_at == "sharing":
                # alpha and beta have shared keys and wait for gamma's shares.
                wait_for_messages(state_dir, "shares", 2)
                restart()
            gamma.share()
            setups = {name: future.result(timeout=WAIT_SECONDS) for name, future in set_ups.items()}  # fmt: skip

        receipt = gamma.upload_update()["receipt"]
        alpha.masking.upload_masked(
            setups["alpha"],
            site_delta("alpha", 0),
            sample_count=sample_count("alpha"),
            upload=alpha.upload,
            signer=alpha.signer,
        )

        def upload_beta() -> None:
            beta.masking.upload_masked(
                setups["beta"],
                site_delta("beta", 0),
                sample_count=sample_count("beta"),
                upload=beta.upload,
                signer=beta.signer,
            )

        beta_upload = threading.Thread(target=upload_beta)
        if kill_at == "uploads":
            service.kill()
            # beta's client retries its upload until the service is back.
            beta_upload.start()
            time.sleep(1.0)
            service.start()
            # gamma did not see its acknowledgement and sends the same envelope.
            assert gamma.envelope is not None
            assert gamma.upload(gamma.envelope)["receipt"] == receipt
        else:
            beta_upload.start()
        beta_upload.join(timeout=WAIT_SECONDS)

        with ThreadPoolExecutor(2) as pool:
            reveals = [
                pool.submit(site.masking.reveal, setups[site.name])
                for site in (alpha, beta)
            ]
            gamma.reveal()
            if kill_at == "revealing":
                restart()
            for future in reveals:
                future.result(timeout=WAIT_SECONDS)
        if kill_at == "finalize":
            # Every reveal is saved, and nothing has been unmasked yet.
            restart()

        with client(service.url, kits["coordinator"]) as coordinator:
            finalized = coordinator.post(
                f"/v1/studies/{STUDY}/rounds/0/finalize", json={}
            )
            assert finalized.status_code == 200, finalized.text
            model = coordinator.get(f"/v1/studies/{STUDY}/models/1")
        assert model.status_code == 200, model.text
        return finalized.json(), model.content, model.headers["X-Medfed-Model-Sha256"]
    finally:
        for site in (alpha, beta, gamma):
            site.close()
        service.stop()


@pytest.fixture(scope="module")
def reference(
    masking_kits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], bytes, str]:
    return run_round(tmp_path_factory.mktemp("reference"), masking_kits, None)


@pytest.mark.parametrize(
    "kill_at", ["advertising", "sharing", "uploads", "revealing", "finalize"]
)
def test_kill_mid_masking_round_same_model(
    masking_kits: dict[str, Path],
    reference: tuple[dict[str, Any], bytes, str],
    tmp_path: Path,
    kill_at: str,
) -> None:
    expected_status, expected_model, expected_sha = reference

    status, model, sha = run_round(tmp_path, masking_kits, kill_at)

    assert expected_status["state"] == "finalized"
    assert status["state"] == "finalized"
    assert status["uploaded"] == list(SITES)
    assert sha == expected_sha
    assert model == expected_model
    log = tmp_path / "audit.jsonl"
    assert verify(log).ok
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events.count("service.started") == 2
    assert events.count("round.finalized") == 1
