"""Studies whose sites keep strategy state: SCAFFOLD and local layers.

Each study runs through ``run_study`` (real Prefect flow, aggregation service
on 127.0.0.1, MLflow on SQLite). The checks then read the service's SQLite
store and the sites' state folders that the study left behind.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load as load_safetensors

from medfed.aggregation.store import Store
from medfed.contract.config import StudyConfig, parse_study_config
from medfed.contract.extras import EXTRA_PREFIX, unflatten_groups
from medfed.contract.wire import read_header
from medfed.flows.training import run_study
from medfed.sites.data import load_split
from medfed.sites.runner import evaluate_weights
from medfed.sites.tensor_files import load_tensors
from tests.conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")

ROUNDS = 2
SITES = ["cleveland", "hungary", "switzerland", "long-beach"]


def study_config(
    config_name: str, study: str, strategy: dict[str, Any], secure_aggregation: str
) -> tuple[StudyConfig, str]:
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / config_name).read_text())
    raw["study"] = study
    raw["training"]["rounds"] = ROUNDS
    raw["strategy"] = strategy
    raw["secure_aggregation"] = secure_aggregation
    return parse_study_config(raw), yaml.safe_dump(raw)


def site_study_dir(work_dir: Path, site: str, study: str) -> Path:
    return work_dir / "sites" / site / "studies" / study


def uploaded_tensor_names(store: Store, study: str) -> list[set[str]]:
    names = []
    for round_number in range(ROUNDS):
        for upload in store.list_uploads(study, round_number):
            header, _ = read_header(upload.envelope)
            names.append({tensor.name for tensor in header.tensors})
    return names


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config_name", "secure_aggregation", "tolerance"),
    [
        ("heart_disease.yaml", "none", 1e-5),
        ("heart_disease_nodp.yaml", "masking", 5e-3),
    ],
    ids=["dp-plain", "nodp-masking"],
)
def test_scaffold_study_runs(
    tmp_path: Path, config_name: str, secure_aggregation: str, tolerance: float
) -> None:
    study = f"scaffold-{secure_aggregation}"
    config, text = study_config(
        config_name, study, {"name": "scaffold"}, secure_aggregation
    )

    summary = run_study(config, text, work_dir=tmp_path)

    assert summary["rounds"] == ROUNDS
    assert 0.5 <= summary["pooled_test_accuracy"] <= 1.0
    store = Store(tmp_path / "aggregation" / "aggregation.sqlite3")
    try:
        names = uploaded_tensor_names(store, study)
        published = store.get_published(study, ROUNDS)
        nothing_at_start = store.get_published(study, 0)
    finally:
        store.close()
    assert len(names) == ROUNDS * len(SITES)
    for tensors in names:
        assert tensors == {
            "linear.weight",
            "linear.bias",
            f"{EXTRA_PREFIX}control_delta/linear.weight",
            f"{EXTRA_PREFIX}control_delta/linear.bias",
        }
    assert nothing_at_start is None
    assert published is not None
    server_control = unflatten_groups(load_safetensors(published))["control_variate"]

    # Every site took part in every round, so c = sum over rounds of the mean
    # control delta = the mean over sites of c_i. That holds only if each
    # site's c_i carried over from round to round in its state file.
    site_controls = [
        load_tensors(
            site_study_dir(tmp_path, site, study) / "scaffold-control.safetensors"
        )
        for site in SITES
    ]
    for key, value in server_control.items():
        site_mean = np.mean([control[key] for control in site_controls], axis=0)
        assert np.abs(site_mean).max() > 1e-3
        np.testing.assert_allclose(value, site_mean, atol=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "secure_aggregation"),
    [("fedavg", "none"), ("scaffold", "masking")],
    ids=["fedavg-plain", "scaffold-masking"],
)
def test_local_layers_study_runs(
    tmp_path: Path, strategy: str, secure_aggregation: str
) -> None:
    study = f"local-bias-{strategy}"
    config, text = study_config(
        "heart_disease.yaml",
        study,
        {"name": strategy, "local_layers": ["linear.bias"]},
        secure_aggregation,
    )

    summary = run_study(config, text, work_dir=tmp_path)

    assert summary["rounds"] == ROUNDS
    store = Store(tmp_path / "aggregation" / "aggregation.sqlite3")
    try:
        names = uploaded_tensor_names(store, study)
        initial = load_safetensors(store.get_model(study, 0).weights)  # type: ignore[union-attr]
        final = load_safetensors(store.get_model(study, ROUNDS).weights)  # type: ignore[union-attr]
    finally:
        store.close()

    assert len(names) == ROUNDS * len(SITES)
    for tensors in names:
        assert "linear.weight" in tensors
        assert not any(name.endswith("linear.bias") for name in tensors)
    # The service keeps its copy of the local layer unchanged.
    np.testing.assert_array_equal(final["linear.bias"], initial["linear.bias"])
    assert not np.array_equal(final["linear.weight"], initial["linear.weight"])

    local_biases = {}
    for site in SITES:
        folder = site_study_dir(tmp_path, site, study)
        local = load_tensors(folder / "local-layers.safetensors")
        assert sorted(local) == ["linear.bias"]
        local_biases[site] = float(local["linear.bias"][0])
        # The flow's evaluation used the global model with the site's bias.
        inputs, labels = load_split(config, folder / "data", "test")
        merged = evaluate_weights(config, {**final, **local}, inputs, labels)
        assert merged.accuracy == pytest.approx(summary["sites"][site]["test_accuracy"])
    assert len(set(local_biases.values())) == len(SITES)
    for bias in local_biases.values():
        assert bias != pytest.approx(float(initial["linear.bias"][0]))
