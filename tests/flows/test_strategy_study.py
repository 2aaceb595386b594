"""Studies with server optimizers, wrappers and FedProx through the real flow."""

from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from medfed.contract.config import parse_study_config
from medfed.flows.training import run_study
from tests.conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config_name", "strategy"),
    [
        (
            "heart_disease.yaml",
            {
                "name": "fedadam",
                "params": {"server_learning_rate": 0.05, "tau": 0.01},
                "wrappers": [
                    {"name": "norm_bound", "params": {"max_norm": 1.0}},
                    {"name": "trimmed_mean", "params": {"beta": 0.25}},
                ],
            },
        ),
        ("heart_disease_nodp.yaml", {"name": "fedprox", "params": {"mu": 0.1}}),
    ],
    ids=["fedadam-trimmed-dp", "fedprox-nodp"],
)
def test_strategy_study_runs(
    tmp_path: Path, config_name: str, strategy: dict[str, Any]
) -> None:
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / config_name).read_text())
    raw["study"] = f"strategy-{strategy['name']}"
    raw["training"]["rounds"] = 2
    raw["strategy"] = strategy
    config = parse_study_config(raw)

    summary = run_study(config, yaml.safe_dump(raw), work_dir=tmp_path)

    assert summary["rounds"] == 2
    assert 0.5 <= summary["pooled_test_accuracy"] <= 1.0
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.params["strategy"] == strategy["name"]
