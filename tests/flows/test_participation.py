"""Rounds that ask only some of the sites, through the real flow and service."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from medfed.aggregation.selection import select_sites
from medfed.contract.config import parse_study_config
from medfed.errors import ConfigError
from medfed.flows.training import run_study
from tests.conftest import CONFIGS


def heart_config(**participation: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(
        (CONFIGS / "heart_disease_nodp.yaml").read_text()
    )
    raw["study"] = "participation"
    raw["training"]["rounds"] = 3
    raw["round"] = {"participation": participation}
    return raw


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_half_participation_asks_chosen_sites(tmp_path: Path) -> None:
    raw = heart_config(fraction=0.5, weighted=True)
    config = parse_study_config(raw)

    summary = run_study(config, yaml.safe_dump(raw), work_dir=tmp_path)

    records = {site: info["train_records"] for site, info in summary["sites"].items()}
    assert summary["rounds"] == 3
    assert [entry["round"] for entry in summary["participants"]] == [0, 1, 2]
    for entry in summary["participants"]:
        chosen = select_sites(
            list(records), records, entry["round"], fraction=0.5, weighted=True
        )
        assert entry["asked"] == chosen
        assert entry["uploaded"] == chosen
        assert entry["state"] == "finalized"
    asked = {site for entry in summary["participants"] for site in entry["asked"]}
    for site, info in summary["sites"].items():
        assert (info["bytes_uploaded"] > 0) == (site in asked)


def test_quorum_default_is_majority_of_chosen() -> None:
    config = parse_study_config(heart_config(fraction=0.5))

    assert config.quorum == 2


def test_quorum_above_round_size_rejected() -> None:
    raw = heart_config(fraction=0.5)
    raw["round"]["quorum"] = 3

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert "round.participation chooses only 2 sites per round" in str(raised.value)


def test_partial_participation_rejected_under_masking() -> None:
    raw = heart_config(fraction=0.5)
    raw["secure_aggregation"] = {"mode": "masking"}

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert "masking secure aggregation runs with every site" in str(raised.value)
