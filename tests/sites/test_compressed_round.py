"""Sites upload compressed updates through the real runner and service.

The heart-disease study runs two rounds at two of its sites, with DP-SGD and
a topk codec with zstd and error feedback. Each site uploads a topk envelope
to the aggregation service on 127.0.0.1 and keeps its residual, and each
round finalizes to a new model version.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from medfed.aggregation.store import Store
from medfed.contract.config import parse_study_config
from medfed.contract.wire import read_header
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient
from medfed.sites.error_feedback import RESIDUAL_FILE_NAME
from medfed.sites.runner import (
    SiteRunner,
    initial_model_weights,
    weights_to_safetensors,
)
from tests.conftest import CONFIGS


def compressed_config(study: str, compression: dict[str, Any]):
    """The DP heart-disease study cut to two sites, two rounds, one epoch."""
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    raw["study"] = study
    raw["sites"] = raw["sites"][:2]
    raw["training"]["rounds"] = 2
    raw["training"]["local_epochs"] = 1
    raw["compression"] = compression
    return parse_study_config(raw)


def test_topk_rounds_with_error_feedback(tmp_path: Path, data_root: Path) -> None:
    config = compressed_config(
        "compressed-topk",
        {"codec": "topk", "params": {"fraction": 0.25}, "zstd": True},
    )
    sites = [site.id for site in config.sites]
    runners = {
        site: SiteRunner(config, site, tmp_path / site, data_root) for site in sites
    }
    settings = {"sites": sites, "strategy": "fedavg"}
    initial = weights_to_safetensors(
        initial_model_weights(config),
        metadata={"medfed_study_settings": json.dumps(settings)},
    )

    with (
        LocalAggregationService(
            tmp_path / "aggregation", max_upload_bytes=1_000_000
        ) as service,
        AggregationClient(service.url) as client,
    ):
        client.create_study(config.study, initial)
        for round_number in range(2):
            client.open_round(
                config.study,
                round_number,
                sites=sites,
                quorum=len(sites),
                deadline_seconds=600,
            )
            for site, runner in runners.items():
                report = runner.train_round(client, round_number)
                assert report.status == "uploaded", (site, report.message)
            status = client.finalize(config.study, round_number)
            assert status["state"] == "finalized"
            assert status["result_version"] == round_number + 1

    for site, runner in runners.items():
        residual = load_file(runner.study_dir / RESIDUAL_FILE_NAME)
        # The logistic regression's weight has 15 elements, topk keeps 4, so
        # the residual contains the 11 others (non-zero after DP noise).
        assert residual["linear.weight"].shape == (1, 15), site
        assert np.count_nonzero(residual["linear.weight"]) >= 11, site


@pytest.mark.parametrize(
    ("codec", "params"),
    [
        ("int8", {"chunk_size": 4}),
        ("topk", {"fraction": 0.25, "value_dtype": "int8", "index_encoding": "bitmap"}),
        ("lowbit", {"bits": 2, "chunk_size": 4}),
    ],
)
def test_runner_envelope_names_codec(
    tmp_path: Path, data_root: Path, codec: str, params: dict[str, Any]
) -> None:
    config = compressed_config(
        f"compressed-{codec}", {"codec": codec, "params": params}
    )
    sites = [site.id for site in config.sites]
    initial = weights_to_safetensors(
        initial_model_weights(config),
        metadata={
            "medfed_study_settings": json.dumps({"sites": sites, "strategy": "fedavg"})
        },
    )
    runner = SiteRunner(config, "cleveland", tmp_path / "cleveland", data_root)

    with (
        LocalAggregationService(
            tmp_path / "aggregation", max_upload_bytes=1_000_000
        ) as service,
        AggregationClient(service.url) as client,
    ):
        client.create_study(config.study, initial)
        client.open_round(config.study, 0, sites=sites, quorum=1, deadline_seconds=600)
        report = runner.train_round(client, 0)

    # The service never returns an upload, so the test reads the stored
    # envelope from the service's own state.
    store = Store(tmp_path / "aggregation" / "aggregation.sqlite3")
    (upload,) = store.list_uploads(config.study, 0)
    header, _ = read_header(upload.envelope)
    assert report.status == "uploaded"
    assert header.codec.name == codec
    assert header.codec.params == params
    assert header.compression == "none"
