"""Masking studies on the real aggregation service (uvicorn on 127.0.0.1)."""

import itertools
import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from medfed.contract.secagg import MaskingSite
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.wire import encode_envelope
from medfed.errors import ServiceError
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient
from medfed.sites.secagg_client import MaskingClient

SITES = ["site-a", "site-b", "site-c", "site-d"]
INITIAL = {"b": np.ones(3, np.float32), "w": np.zeros((2, 3), np.float32)}
SECURE = SecureAggregationConfig(mode="masking", fractional_bits=16, max_weight=100)
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalAggregationService]:
    with LocalAggregationService(
        tmp_path_factory.mktemp("aggregation"), max_upload_bytes=1_000_000
    ) as running:
        yield running


def create_study(client: AggregationClient, secure: str | dict) -> str:
    name = f"masked-{next(_study_numbers)}"
    settings = json.dumps(
        {"sites": SITES, "strategy": "fedavg", "secure_aggregation": secure}
    )
    client.create_study(
        name, save_safetensors(INITIAL, metadata={"medfed_study_settings": settings})
    )
    client.open_round(name, 0, sites=SITES, quorum=3, deadline_seconds=600)
    return name


def site_delta(index: int) -> dict[str, np.ndarray]:
    return {
        "b": np.full(3, 0.1 * index, np.float32),
        "w": np.full((2, 3), -0.05 * index, np.float32),
    }


def run_site(url: str, study: str, index: int, errors: list) -> None:
    name = SITES[index]
    site = MaskingSite(
        site=name, study=study, round_number=0, encoding=SECURE.encoding(4)
    )
    with AggregationClient(url) as client:
        masking = MaskingClient(url, poll_interval=0.05)
        try:
            masking.run_round(
                site,
                site_delta(index),
                sample_count=10 * (index + 1),
                wait_seconds=60,
                upload=lambda envelope: client.upload(study, 0, name, envelope),
            )
        except Exception as error:  # reported by the test's assert
            errors.append(error)
        finally:
            masking.close()


def test_masking_round_finalizes(service: LocalAggregationService) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client, SECURE.model_dump(mode="json"))
        errors: list = []
        threads = [
            threading.Thread(target=run_site, args=(service.url, study, index, errors))
            for index in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        status = client.finalize(study, 0)
        model = client.download_model(study)

    assert errors == []
    assert status["state"] == "finalized"
    assert sorted(status["uploaded"]) == SITES
    weights = [10 * (index + 1) for index in range(4)]
    mean_b = sum(0.1 * index * weight for index, weight in enumerate(weights)) / 100
    mean_w = sum(-0.05 * index * weight for index, weight in enumerate(weights)) / 100
    bound = SECURE.encoding(4).error_bound(4) / 100 + 1e-7
    np.testing.assert_allclose(model.weights["b"], 1.0 + mean_b, atol=bound)
    np.testing.assert_allclose(model.weights["w"], mean_w, atol=bound)


def test_plain_upload_rejected_in_masking_study(
    service: LocalAggregationService,
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client, "masking")
        envelope = encode_envelope(
            site_delta(1),
            study=study,
            round_number=0,
            site="site-a",
            sample_count=5,
            nonce="0123456789abcdef",
        )

        with pytest.raises(ServiceError) as error:
            client.upload(study, 0, "site-a", envelope)

    assert error.value.status_code == 409
    assert "envelope codec is 'fp32' with {}; this round uses secure aggregation" in (
        str(error.value)
    )


def test_masked_upload_rejected_in_plain_study(
    service: LocalAggregationService,
) -> None:
    with AggregationClient(service.url) as client:
        study = create_study(client, "none")
        envelope = encode_envelope(
            {"b": np.zeros(3, np.uint32), "w": np.zeros((2, 3), np.uint32)},
            study=study,
            round_number=0,
            site="site-a",
            sample_count=5,
            nonce="0123456789abcdef",
            codec_name="masked",
            codec_params={"fractional_bits": 16},
        )

        with pytest.raises(ServiceError) as error:
            client.upload(study, 0, "site-a", envelope)

    assert error.value.status_code == 422
    assert (
        f"envelope codec 'masked' needs secure_aggregation 'masking', but study "
        f"{study!r} uses 'none'"
    ) in str(error.value)
