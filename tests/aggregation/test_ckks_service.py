"""CKKS studies on the real aggregation service (uvicorn on 127.0.0.1)."""

import hashlib
import itertools
import json
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

pytest.importorskip("tenseal")

from medfed.contract.codecs.ckks import CkksEncryptor, ciphertext_arrays
from medfed.contract.secagg.ckks import (
    CkksParameters,
    CkksSiteContext,
    round_for_release,
)
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.secagg.layout import VectorLayout
from medfed.contract.wire import encode_envelope
from medfed.errors import ServiceError
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient

SITES = ["site-a", "site-b", "site-c", "site-d"]
INITIAL = {"b": np.ones(3, np.float32), "w": np.zeros((2, 3), np.float32)}
LAYOUT = VectorLayout.of(INITIAL)
SECURE = SecureAggregationConfig(mode="ckks", max_weight=100)
PARAMETERS = SECURE.ckks_parameters()
COUNTS = {site: 10 * (index + 1) for index, site in enumerate(SITES)}
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalAggregationService]:
    with LocalAggregationService(
        tmp_path_factory.mktemp("aggregation"), max_upload_bytes=1_000_000
    ) as running:
        yield running


@pytest.fixture(scope="module")
def context() -> CkksSiteContext:
    return CkksSiteContext.create(PARAMETERS)


def create_study(client: AggregationClient) -> str:
    name = f"ckks-{next(_study_numbers)}"
    settings = json.dumps(
        {
            "sites": SITES,
            "strategy": "fedavg",
            "secure_aggregation": SECURE.model_dump(mode="json"),
        }
    )
    client.create_study(
        name, save_safetensors(INITIAL, metadata={"medfed_study_settings": settings})
    )
    client.open_round(name, 0, sites=SITES, quorum=3, deadline_seconds=600)
    return name


def site_delta(site: str) -> dict[str, np.ndarray]:
    index = SITES.index(site)
    return {
        "b": np.full(3, 0.1 * index, np.float32),
        "w": np.full((2, 3), -0.05 * index, np.float32),
    }


def encrypted_envelope(
    context: CkksSiteContext, study: str, site: str, **overrides: object
) -> bytes:
    arguments: dict = {
        "study": study,
        "round_number": 0,
        "site": site,
        "sample_count": COUNTS[site],
        "nonce": secrets.token_hex(16),
        "codec": CkksEncryptor(context, sample_count=COUNTS[site], clip=SECURE.clip),
    }
    arguments.update(overrides)
    return encode_envelope(site_delta(site), **arguments)


def with_ciphertexts(
    study: str, site: str, chunks: list[bytes], codec_params: dict
) -> bytes:
    """An envelope whose payload is ``chunks``, as a site that lies would send."""

    class Replayed:
        name = "ckks"
        params = codec_params

        def encode(self, update: object) -> dict[str, np.ndarray]:
            return ciphertext_arrays(chunks)

    return encode_envelope(
        site_delta(site),
        study=study,
        round_number=0,
        site=site,
        sample_count=COUNTS[site],
        nonce=secrets.token_hex(16),
        codec=Replayed(),
    )


def decrypt_and_send(
    client: AggregationClient, context: CkksSiteContext, study: str, site: str
) -> dict:
    encrypted = client.download_encrypted_sum(study, 0)
    vector = round_for_release(
        context.decrypt_vector(encrypted.ciphertexts, LAYOUT.length), PARAMETERS
    )
    tensors = {
        name: value.astype(np.float32) for name, value in LAYOUT.split(vector).items()
    }
    envelope = encode_envelope(
        tensors,
        study=study,
        round_number=0,
        site=site,
        sample_count=encrypted.sample_count,
        nonce=secrets.token_hex(16),
    )
    return client.upload_decrypted_sum(study, 0, site, envelope)


def expected_weights(sites: list[str]) -> dict[str, np.ndarray]:
    total = sum(COUNTS[site] for site in sites)
    mean = {
        name: sum(site_delta(site)[name] * COUNTS[site] for site in sites) / total
        for name in INITIAL
    }
    return {name: INITIAL[name] + mean[name] for name in INITIAL}


# Half a release grid step plus the CKKS error, divided by the least total
# weight of these tests (60).
TOLERANCE = (PARAMETERS.release_grid / 2 + 1e-4) / 60


def test_ckks_round_finalizes(
    service: LocalAggregationService, context: CkksSiteContext
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client)
        for site in SITES:
            client.upload(study, 0, site, encrypted_envelope(context, study, site))

        closing = client.finalize(study, 0)
        decrypted = decrypt_and_send(client, context, study, "site-a")
        final = client.finalize(study, 0)
        model = client.download_model(study)

    assert closing["state"] == "open"
    assert closing["ckks"] == {
        "phase": "decrypting",
        "contributors": SITES,
        "sample_count": 100,
    }
    assert decrypted["site"] == "site-a"
    assert final["state"] == "finalized"
    assert final["ckks"]["phase"] == "decrypted"
    assert model.version == 1
    for name, value in expected_weights(SITES).items():
        np.testing.assert_allclose(model.weights[name], value, atol=TOLERANCE)


def test_dropped_site_yields_survivors_sum(
    service: LocalAggregationService, context: CkksSiteContext
) -> None:
    survivors = ["site-a", "site-b", "site-c"]
    with AggregationClient(service.url) as client:
        study = create_study(client)
        for site in survivors:
            client.upload(study, 0, site, encrypted_envelope(context, study, site))

        closing = client.finalize(study, 0, absent=["site-d"])
        encrypted = client.download_encrypted_sum(study, 0)
        decrypt_and_send(client, context, study, "site-b")
        final = client.finalize(study, 0)
        model = client.download_model(study)

    assert closing["ckks"]["contributors"] == survivors
    assert encrypted.contributors == survivors
    assert encrypted.sample_count == 60
    assert final["state"] == "finalized"
    for name, value in expected_weights(survivors).items():
        np.testing.assert_allclose(model.weights[name], value, atol=TOLERANCE)


def tampered_uploads(context: CkksSiteContext, study: str) -> dict[str, bytes]:
    valid = encrypted_envelope(context, study, "site-b")
    flipped = bytearray(valid)
    flipped[-1000] ^= 0xFF
    chunks = context.encrypt_update(
        site_delta("site-b"), sample_count=COUNTS["site-b"], clip=SECURE.clip
    )
    corrupt = bytearray(chunks[0])
    corrupt[100] ^= 0xFF
    params = CkksEncryptor(context, sample_count=1, clip=1.0).params
    other_scale = CkksSiteContext.from_bytes(
        context.secret_bytes(), CkksParameters(scale_bits=25)
    )
    return {
        "payload changed after hashing": bytes(flipped),
        "unreadable ciphertext": with_ciphertexts(
            study, "site-b", [bytes(corrupt)], params
        ),
        "oversized ciphertext": with_ciphertexts(
            study,
            "site-b",
            [chunks[0] + bytes(PARAMETERS.max_ciphertext_bytes)],
            params,
        ),
        "extra ciphertext": with_ciphertexts(
            study, "site-b", [chunks[0], chunks[0]], params
        ),
        "other scale": with_ciphertexts(
            study,
            "site-b",
            other_scale.encrypt_vector(np.zeros(LAYOUT.length)),
            params,
        ),
        "other parameters": with_ciphertexts(
            study, "site-b", chunks, {**params, "scale_bits": 25}
        ),
        "plain update": encode_envelope(
            site_delta("site-b"),
            study=study,
            round_number=0,
            site="site-b",
            sample_count=20,
            nonce=secrets.token_hex(16),
        ),
        "sample count above max_weight": encrypted_envelope(
            context, study, "site-b", sample_count=101
        ),
    }


EXPECTED_REJECTIONS = {
    "payload changed after hashing": (400, "payload_sha256 does not match"),
    "unreadable ciphertext": (
        422,
        "ciphertext 0 from 'site-b' is unreadable: ciphertext data is invalid",
    ),
    "oversized ciphertext": (400, "more than the 135168 of a ciphertext"),
    "extra ciphertext": (400, "payload has unexpected array 'ciphertext-0001'"),
    "other scale": (422, "the study encrypts at scale 1073741824.0"),
    "other parameters": (422, "expects 'ckks' with"),
    "plain update": (422, "envelope codec is 'fp32' with {}"),
    "sample count above max_weight": (
        422,
        "sample_count 101 exceeds secure_aggregation.max_weight 100",
    ),
}


def test_tampered_ciphertexts_rejected(
    service: LocalAggregationService, context: CkksSiteContext
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client)
        client.upload(study, 0, "site-a", encrypted_envelope(context, study, "site-a"))
        errors = {}
        for case, envelope in tampered_uploads(context, study).items():
            with pytest.raises(ServiceError) as error:
                client.upload(study, 0, "site-b", envelope)
            errors[case] = error.value
        uploaded = client.round_status(study, 0)["uploaded"]
        for site in ["site-b", "site-c"]:
            client.upload(study, 0, site, encrypted_envelope(context, study, site))
        client.finalize(study, 0, absent=["site-d"])
        decrypt_and_send(client, context, study, "site-c")
        final = client.finalize(study, 0)
        model = client.download_model(study)

    for case, (status, message) in EXPECTED_REJECTIONS.items():
        assert errors[case].status_code == status, case
        assert message in str(errors[case]), case
    assert uploaded == ["site-a"]
    assert final["state"] == "finalized"
    survivors = ["site-a", "site-b", "site-c"]
    for name, value in expected_weights(survivors).items():
        np.testing.assert_allclose(model.weights[name], value, atol=TOLERANCE)


def test_upload_after_close_rejected(
    service: LocalAggregationService, context: CkksSiteContext
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client)
        for site in SITES[:3]:
            client.upload(study, 0, site, encrypted_envelope(context, study, site))
        client.finalize(study, 0, absent=["site-d"])

        with pytest.raises(ServiceError) as error:
            client.upload(
                study, 0, "site-d", encrypted_envelope(context, study, "site-d")
            )
        status = client.round_status(study, 0)

    assert error.value.status_code == 409
    assert "has closed its uploads and waits for a site to decrypt" in str(error.value)
    assert status["uploaded"] == SITES[:3]
    assert status["ckks"]["contributors"] == SITES[:3]


def test_sum_unavailable_before_close(
    service: LocalAggregationService, context: CkksSiteContext
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client)
        client.upload(study, 0, "site-a", encrypted_envelope(context, study, "site-a"))

        with pytest.raises(ServiceError) as error:
            client.download_encrypted_sum(study, 0)

    assert error.value.status_code == 425
    assert f"round 0 of study {study!r} has no encrypted sum yet" in str(error.value)


def test_bad_decrypted_sums_rejected(
    service: LocalAggregationService, context: CkksSiteContext
) -> None:
    other_key = CkksSiteContext.create(PARAMETERS)
    with AggregationClient(service.url) as client:
        study = create_study(client)
        for site in SITES:
            client.upload(study, 0, site, encrypted_envelope(context, study, site))
        client.finalize(study, 0)
        encrypted = client.download_encrypted_sum(study, 0)

        def send(vector: np.ndarray, sample_count: int = 100) -> ServiceError:
            tensors = {
                name: value.astype(np.float32)
                for name, value in LAYOUT.split(vector).items()
            }
            envelope = encode_envelope(
                tensors,
                study=study,
                round_number=0,
                site="site-a",
                sample_count=sample_count,
                nonce=secrets.token_hex(16),
            )
            with pytest.raises(ServiceError) as error:
                client.upload_decrypted_sum(study, 0, "site-a", envelope)
            return error.value

        correct = context.decrypt_vector(encrypted.ciphertexts, LAYOUT.length)
        wrong_count = send(correct, sample_count=99)
        garbage = send(other_key.decrypt_vector(encrypted.ciphertexts, LAYOUT.length))
        status = client.finalize(study, 0)

    assert wrong_count.status_code == 422
    assert "decrypted sum has sample_count 99, but the contributors" in str(wrong_count)
    assert garbage.status_code == 422
    assert "may hold another CKKS secret context than the others" in str(garbage)
    assert status["state"] == "open"
    assert status["ckks"]["phase"] == "decrypting"


def secret_windows(context: CkksSiteContext) -> list[bytes]:
    """32-byte pieces of the raw secret key and of the secret context file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "secret.key"
        context._context.secret_key().data.save(str(path))
        raw_key = path.read_bytes()
    pieces = []
    for data in (raw_key, context.secret_bytes()):
        pieces += [data[offset : offset + 32] for offset in range(256, len(data), 997)]
    return pieces


def test_service_never_holds_secret_key(
    service: LocalAggregationService, context: CkksSiteContext
) -> None:
    responses = []
    with AggregationClient(service.url) as client:
        http = client.http_client
        study = create_study(client)
        for site in SITES:
            client.upload(study, 0, site, encrypted_envelope(context, study, site))
        responses.append(http.post(f"/v1/studies/{study}/rounds/0/finalize", json={}))
        responses.append(http.get(f"/v1/studies/{study}/rounds/0/ckks/sum"))
        decrypt_and_send(client, context, study, "site-a")
        for path in ("/rounds/0/finalize", "/rounds/0", "", "/models/1"):
            if path.endswith("finalize"):
                responses.append(http.post(f"/v1/studies/{study}{path}", json={}))
            else:
                responses.append(http.get(f"/v1/studies/{study}{path}"))
    stored = b"".join(
        path.read_bytes() for path in service.state_dir.rglob("*") if path.is_file()
    )
    answered = b"".join(
        response.content + str(response.headers).encode() for response in responses
    )
    windows = secret_windows(context)

    assert len(windows) > 200
    # A store holding the secret context would fail the checks below.
    assert [window for window in windows if window in stored + context.secret_bytes()]
    assert all(response.status_code == 200 for response in responses)
    assert len(stored) > 4 * 131_000
    assert [window for window in windows if window in stored] == []
    assert [window for window in windows if window in answered] == []
    digest = hashlib.sha256(context.secret_bytes()).hexdigest().encode()
    assert digest not in stored
