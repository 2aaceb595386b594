"""Site state between rounds against a real aggregation service.

A site's SCAFFOLD control variate and its local layers change only when the
service accepts its upload. The service runs as a uvicorn process on
127.0.0.1; the sites are ``SiteRunner`` objects on the real heart-disease
files.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from medfed.contract.config import StudyConfig, parse_study_config
from medfed.errors import ServiceError
from medfed.sites.client import AggregationClient
from medfed.sites.runner import (
    SiteRunner,
    initial_model_weights,
    weights_to_safetensors,
)
from medfed.sites.tensor_files import load_tensors, save_tensors_atomic
from tests.conftest import CONFIGS
from tests.study_service import create_study


def make_config(strategy: dict[str, Any]) -> StudyConfig:
    raw = yaml.safe_load((CONFIGS / "heart_disease_nodp.yaml").read_text())
    raw["study"] = "site-state"
    raw["strategy"] = strategy
    return parse_study_config(raw)


def open_round(client: AggregationClient, round_number: int, sites: list[str]) -> None:
    client.open_round(
        "site-state", round_number, sites=sites, quorum=1, deadline_seconds=300
    )


def test_rejected_upload_keeps_site_state(
    tmp_path: Path, service: AggregationClient, data_root: Path
) -> None:
    config = make_config({"name": "scaffold", "local_layers": ["linear.bias"]})
    create_study(service, config)
    cleveland = SiteRunner(config, "cleveland", tmp_path / "cleveland", data_root)
    hungary = SiteRunner(config, "hungary", tmp_path / "hungary", data_root)

    # Round 0 is for Hungary only, so Cleveland's upload is rejected (403).
    open_round(service, 0, ["hungary"])
    with pytest.raises(ServiceError, match="does not take part in round 0"):
        cleveland.train_round(service, 0)
    assert not cleveland.control_variate_path.exists()
    assert not cleveland.local_layers_path.exists()

    hungary.train_round(service, 0)
    assert service.finalize("site-state", 0)["state"] == "finalized"
    published = service.download_published("site-state", 1)
    assert sorted(published["control_variate"]) == ["linear.weight"]

    open_round(service, 1, ["cleveland", "hungary"])
    cleveland.train_round(service, 1)
    control = cleveland.control_variate_path.read_bytes()
    local = cleveland.local_layers_path.read_bytes()
    assert sorted(load_tensors(cleveland.control_variate_path)) == ["linear.weight"]
    assert sorted(load_tensors(cleveland.local_layers_path)) == ["linear.bias"]

    # Training round 1 again yields a different update, which the service
    # rejects (409) because Cleveland already uploaded one.
    with pytest.raises(ServiceError, match="already uploaded a different update"):
        cleveland.train_round(service, 1)
    assert cleveland.control_variate_path.read_bytes() == control
    assert cleveland.local_layers_path.read_bytes() == local


def test_service_rejects_uploaded_local_layer(
    tmp_path: Path, service: AggregationClient, data_root: Path
) -> None:
    config = make_config({"name": "fedavg", "local_layers": ["linear.bias"]})
    create_study(service, config)
    open_round(service, 0, ["cleveland"])
    # A site that ignores local_layers uploads every tensor.
    careless = SiteRunner(
        make_config({"name": "fedavg"}), "cleveland", tmp_path / "site", data_root
    )

    with pytest.raises(ServiceError) as error:
        careless.train_round(service, 0)

    assert error.value.status_code == 422
    assert "unexpected ['linear.bias']" in str(error.value)
    assert "are local layers of this study and must not be uploaded" in str(error.value)
    assert service.round_status("site-state", 0)["uploaded"] == []


def test_scaffold_study_requires_control_delta(
    tmp_path: Path, service: AggregationClient, data_root: Path
) -> None:
    create_study(service, make_config({"name": "scaffold"}))
    open_round(service, 0, ["cleveland"])
    # A site configured for FedAvg uploads its delta without control deltas.
    plain = SiteRunner(
        make_config({"name": "fedavg"}), "cleveland", tmp_path / "site", data_root
    )

    with pytest.raises(ServiceError) as error:
        plain.train_round(service, 0)

    assert error.value.status_code == 422
    assert (
        "missing ['extra/control_delta/linear.bias', "
        "'extra/control_delta/linear.weight']" in str(error.value)
    )
    assert service.round_status("site-state", 0)["uploaded"] == []


def test_service_rejects_unmatched_local_layer(service: AggregationClient) -> None:
    config = make_config({"name": "fedavg"})
    settings = {
        "sites": ["cleveland"],
        "strategy": "fedavg",
        "strategy_params": {},
        "local_layers": ["norm.*"],
    }
    body = weights_to_safetensors(
        initial_model_weights(config),
        metadata={"medfed_study_settings": json.dumps(settings)},
    )

    with pytest.raises(ServiceError) as error:
        service.create_study("site-state", body)

    assert error.value.status_code == 422
    assert "pattern 'norm.*' matches no parameter of the initial model" in str(
        error.value
    )
    with pytest.raises(ServiceError, match="not found"):
        service.study_status("site-state")


def test_published_of_initial_model_is_empty(service: AggregationClient) -> None:
    create_study(service, make_config({"name": "scaffold"}))
    assert service.download_published("site-state", 0) == {}
    with pytest.raises(
        ServiceError, match=r"model version 3 of study 'site-state' not found"
    ):
        service.download_published("site-state", 3)


def test_evaluation_uses_site_local_layers(
    tmp_path: Path, service: AggregationClient, data_root: Path
) -> None:
    config = make_config({"name": "fedavg", "local_layers": ["linear.bias"]})
    create_study(service, config)
    site = SiteRunner(config, "switzerland", tmp_path / "site", data_root)
    before = site.evaluate(service, 0)
    # A bias of -50 makes every prediction negative.
    save_tensors_atomic(
        site.local_layers_path, {"linear.bias": np.array([-50.0], np.float32)}
    )

    after = site.evaluate(service, 0)

    negatives = sum(after.negative_histogram)
    assert after.correct == negatives
    assert before.correct != negatives
