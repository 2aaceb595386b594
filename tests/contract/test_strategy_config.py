"""The strategy section of the study config: wrappers and their checks."""

from typing import Any

import pytest
import yaml

from medfed.aggregation.compatibility import build_study_strategy
from medfed.aggregation.wrappers.central_dp import CentralDP
from medfed.contract.config import parse_study_config
from medfed.errors import ConfigError
from tests.conftest import CONFIGS


def config_with(strategy: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    raw["strategy"] = strategy
    return raw


def test_wrappers_accepted_in_order() -> None:
    config = parse_study_config(
        config_with(
            {
                "name": "fedadam",
                "params": {"server_learning_rate": 0.05},
                "wrappers": [
                    {"name": "norm_bound", "params": {"max_norm": 1.0}},
                    {"name": "trimmed_mean", "params": {"beta": 0.25}},
                ],
            }
        )
    )
    settings = config.strategy_settings()
    assert settings["wrappers"] == [
        ["norm_bound", {"max_norm": 1.0}],
        ["trimmed_mean", {"beta": 0.25}],
    ]
    assert settings["total_sites"] == 4


def test_central_dp_total_sites_from_site_list() -> None:
    config = parse_study_config(
        config_with(
            {
                "name": "fedavg",
                "wrappers": [
                    {
                        "name": "central_dp",
                        "params": {"clip_norm": 1.0, "noise_multiplier": 1.0},
                    }
                ],
            }
        )
    )
    strategy = build_study_strategy(config.strategy_settings())
    assert isinstance(strategy, CentralDP)
    assert strategy.total_sites == 4


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (
            {"name": "fedavg", "wrappers": [{"name": "median"}, {"name": "krum"}]},
            "wrappers ['median', 'krum'] each combine the updates themselves",
        ),
        (
            {"name": "fedavg", "wrappers": [{"name": "clip"}]},
            "unknown wrapper 'clip'",
        ),
        (
            {
                "name": "fedavg",
                "wrappers": [{"name": "trimmed_mean", "params": {"beta": 0.7}}],
            },
            "beta must be < 0.5, got 0.7",
        ),
        ({"name": "fedyogi", "params": {"tau": -1}}, "tau must be > 0.0, got -1"),
        (
            {"name": "fedavg", "wrappers": [{"name": "median", "extra": 1}]},
            "extra",
        ),
        (
            {
                "name": "fedavg",
                "wrappers": [
                    {
                        "name": "central_dp",
                        "params": {
                            "clip_norm": 1.0,
                            "noise_multiplier": 1.0,
                            "noise_key": bytes(32),
                        },
                    }
                ],
            },
            "central_dp noise_key is for tests only; remove it",
        ),
    ],
)
def test_invalid_strategy_rejected(strategy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_study_config(config_with(strategy))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("wrappers", "message"),
    [
        (
            [{"name": "median"}],
            "median needs each site's update, but masking secure aggregation "
            "reveals only the sum",
        ),
        (
            [{"name": "norm_bound", "params": {"max_norm": 1.0}}],
            "wrapper 'norm_bound' cannot run with masking secure aggregation yet",
        ),
    ],
)
def test_masking_rejects_unsupported_wrappers(
    wrappers: list[dict[str, Any]], message: str
) -> None:
    raw = config_with({"name": "fedavg", "wrappers": wrappers})
    raw["secure_aggregation"] = "masking"
    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)
    assert message in str(error.value)


def test_masking_accepts_server_optimizer() -> None:
    raw = config_with({"name": "fedadam", "params": {"tau": 0.01}})
    raw["secure_aggregation"] = "masking"
    assert parse_study_config(raw).strategy.name == "fedadam"


@pytest.mark.parametrize("secure_aggregation", ["none", "masking"])
def test_scaffold_accepted_in_study(secure_aggregation: str) -> None:
    raw = config_with({"name": "scaffold"})
    raw["secure_aggregation"] = secure_aggregation
    config = parse_study_config(raw)
    strategy = build_study_strategy(
        config.strategy_settings(), secure_aggregation=secure_aggregation
    )
    assert strategy.site_extras == ("control_delta",)


def test_local_layers_accepted_and_passed_on() -> None:
    config = parse_study_config(
        config_with({"name": "fedavg", "local_layers": ["linear.bias"]})
    )
    assert config.strategy.local_layers == ["linear.bias"]
    assert config.strategy_settings()["local_layers"] == ["linear.bias"]


def test_local_layers_match_resnet_group_norms() -> None:
    raw = yaml.safe_load((CONFIGS / "pneumonia_nodp.yaml").read_text())
    raw["strategy"] = {"name": "fedavg", "local_layers": ["*norm*"]}
    config = parse_study_config(raw)
    assert config.strategy.local_layers == ["*norm*"]


@pytest.mark.parametrize(
    ("local_layers", "message"),
    [
        (
            ["linear.bias", "bn.*"],
            "strategy.local_layers pattern 'bn.*' matches no parameter of model "
            "'logistic_regression'; its parameters are [linear.bias, linear.weight]",
        ),
        (
            ["linear.*"],
            "strategy.local_layers ['linear.*'] match every parameter of model "
            "'logistic_regression', so the sites would share nothing",
        ),
        ([""], "strategy.local_layers entries must be non-empty strings"),
    ],
)
def test_local_layers_rejected(local_layers: list[str], message: str) -> None:
    raw = config_with({"name": "fedavg", "local_layers": local_layers})
    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)
    assert message in str(error.value)
