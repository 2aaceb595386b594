"""A short federated imaging study through the real flow, with DP-SGD at every site."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from medfed.contract.config import parse_study_config
from medfed.flows.training import run_study
from tests.conftest import CONFIGS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api", "mlflow_uri")]


def test_pneumonia_dp_study_end_to_end(tmp_path: Path, pneumonia_root: Path) -> None:
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / "pneumonia.yaml").read_text())
    raw["study"] = "e2e-pneumonia"
    raw["training"]["rounds"] = 2
    raw["data"]["root"] = str(pneumonia_root)
    raw["data"]["augment"] = True
    raw["data"]["feature_skew"] = 0.5
    config = parse_study_config(raw)

    summary = run_study(config, yaml.safe_dump(raw), work_dir=tmp_path)

    assert summary["rounds"] == 2
    assert summary["refusals"] == []
    assert set(summary["sites"]) == {f"hospital-{s}" for s in "abcde"}
    train_records = sum(v["train_records"] for v in summary["sites"].values())
    assert 4000 < train_records < 4708
    for site, values in summary["sites"].items():
        assert 0 < values["epsilon_spent"] <= 8.0, site
    assert 0.0 <= summary["pooled_test_accuracy"] <= 1.0
    assert summary["pooled_test_auc"] is not None
