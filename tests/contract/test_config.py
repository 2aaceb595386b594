from pathlib import Path

import pytest

from medfed.contract.config import load_study_config, parse_study_config
from medfed.errors import ConfigError
from tests.conftest import CONFIGS


def minimal() -> dict[str, object]:
    return {
        "study": "demo",
        "data": {"dataset": "heart_disease"},
        "sites": [{"id": "a", "source": "processed.va.data"}, {"id": "b"}],
        "model": {"name": "logistic_regression", "params": {"in_features": 15}},
        "training": {"rounds": 2, "learning_rate": 0.1},
    }


@pytest.mark.parametrize(
    "name", sorted(path.name for path in CONFIGS.glob("heart_disease*.yaml"))
)
def test_shipped_configs_validate(name: str) -> None:
    config = load_study_config(CONFIGS / name)

    assert len(config.sites) == 4


@pytest.mark.parametrize(
    "name", sorted(path.name for path in CONFIGS.glob("pneumonia*.yaml"))
)
def test_pneumonia_configs_validate(name: str) -> None:
    config = load_study_config(CONFIGS / name)

    assert config.data.dataset == "pneumoniamnist"


def test_defaults_and_quorum() -> None:
    config = parse_study_config(minimal())

    assert config.quorum == 2
    assert config.privacy.enabled is False
    assert config.strategy.name == "fedavg"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"learning_rat": 0.1},
            "unknown key 'training.learning_rat'; remove it or check its spelling",
        ),
        (
            {"rounds": 0},
            "training.rounds: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            {"batch_size": "many"},
            "training.batch_size: Input should be a valid integer",
        ),
    ],
)
def test_invalid_training_values_name_the_key(
    change: dict[str, object], expected: str
) -> None:
    raw = minimal()
    raw["training"] = {**raw["training"], **change}  # type: ignore[dict-item]

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert expected in str(raised.value)


def test_invalid_site_identifier() -> None:
    raw = minimal()
    raw["sites"] = [{"id": "../etc"}]

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert "sites.0.id: String should match pattern" in str(raised.value)
    assert "(got '../etc')" in str(raised.value)


def test_duplicate_sites_rejected() -> None:
    raw = minimal()
    raw["sites"] = [{"id": "a"}, {"id": "a"}]

    with pytest.raises(ConfigError, match="site ids must be unique; repeated: a"):
        parse_study_config(raw)


def test_privacy_requires_budget() -> None:
    raw = minimal()
    raw["privacy"] = {"enabled": True, "epsilon": 1.0}

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert (
        "privacy.epsilon and privacy.delta are required when privacy.enabled is true"
        in str(raised.value)
    )


def test_quorum_larger_than_sites_rejected() -> None:
    raw = minimal()
    raw["round"] = {"quorum": 3}

    with pytest.raises(
        ConfigError, match=r"round\.quorum is 3 but the study has only 2 sites"
    ):
        parse_study_config(raw)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("study: [unclosed")

    with pytest.raises(ConfigError, match="not found; pass the path of a YAML file"):
        load_study_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_study_config(broken)


@pytest.mark.parametrize(
    "text",
    [
        # Python's int parser rejects more than 4300 digits with ValueError.
        "study: s\ntraining: {rounds: " + "9" * 5000 + "}\n",
        # Deep nesting exhausts PyYAML's recursive constructor.
        "study: " + "[" * 100_000 + "]" * 100_000 + "\n",
    ],
    ids=["long integer", "deep nesting"],
)
def test_unparsable_yaml_is_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=r"study\.yaml' is not valid YAML"):
        load_study_config(path)


def test_cosine_schedule_per_round() -> None:
    raw = minimal()
    raw["training"] = {
        "rounds": 4,
        "learning_rate": 0.1,
        "learning_schedule": "cosine",
    }
    training = parse_study_config(raw).training

    rates = [training.round_learning_rate(number) for number in range(1, 5)]

    # 0.1 * (1 + cos(pi * k / 4)) / 2 for k = 0..3.
    assert rates == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447], rel=1e-5)


def test_constant_schedule_keeps_rate() -> None:
    training = parse_study_config(minimal()).training

    assert training.round_learning_rate(2) == 0.1


def test_youden_rejected_without_validation_split() -> None:
    raw = minimal()
    raw["evaluation"] = {"operating_point": "youden"}

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert "heart_disease sites keep only train and test splits" in str(raised.value)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            {"name": "resnet_gnn", "params": {"in_features": 15}},
            "model.name: unknown model; choose one of logistic_regression, "
            "resnet_gn, scatter_gn (got 'resnet_gnn')",
        ),
        (
            {"name": "logistic_regression", "params": {"in_features": 15, "hidden": 3}},
            "model.params: invalid parameters for model 'logistic_regression': "
            "unexpected keyword argument 'hidden'; it accepts in_features",
        ),
        (
            {"name": "logistic_regression"},
            "model.params: invalid parameters for model 'logistic_regression': "
            "missing required parameter 'in_features'; set it in model.params",
        ),
        (
            {"name": "logistic_regression", "params": {"in_features": 0}},
            "model.params: invalid parameters for model 'logistic_regression': "
            "in_features must be a positive integer, got 0",
        ),
        (
            {"name": "logistic_regression", "params": {"in_features": 15.0}},
            "model.params: invalid parameters for model 'logistic_regression': "
            "in_features must be a positive integer, got 15.0",
        ),
        (
            {"name": "scatter_gn", "params": {"groups": True}},
            "model.params: invalid parameters for model 'scatter_gn': "
            "groups must be a positive integer, got True",
        ),
        (
            {"name": "resnet_gn", "params": {"depth": 3}},
            "model.params: invalid parameters for model 'resnet_gn': unexpected "
            "keyword argument 'depth'; it accepts in_channels, widths, groups",
        ),
    ],
)
def test_invalid_model_rejected_at_load(
    model: dict[str, object], expected: str
) -> None:
    raw = minimal()
    raw["model"] = model

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert expected in str(raised.value)


def test_model_check_keeps_torch_random_state() -> None:
    import torch

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)

    parse_study_config(minimal())

    assert torch.equal(torch.rand(3), expected)


def test_unknown_heart_source_rejected_at_load() -> None:
    raw = minimal()
    raw["sites"] = [
        {"id": "a", "source": "processed.va.data"},
        {"id": "long-beach", "source": "processed.lb.data"},
    ]

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    message = str(raised.value)
    assert "source 'processed.lb.data' of site 'long-beach'" in message
    assert "is not a heart-disease file" in message
    assert (
        "choose one of processed.cleveland.data, processed.hungarian.data, "
        "processed.switzerland.data, processed.va.data" in message
    )


def test_missing_source_file_passes_config_check(tmp_path: Path) -> None:
    # The file lives at the site, which may be another machine, so loading
    # the config checks only its name.
    raw = minimal()
    raw["data"] = {"dataset": "heart_disease", "root": str(tmp_path / "absent")}

    config = parse_study_config(raw)

    assert config.sites[0].source == "processed.va.data"


def test_cross_section_error_unprefixed() -> None:
    raw = minimal()
    raw["strategy"] = {"name": "fedavgg"}

    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    message = str(raised.value)
    assert "(top level)" not in message
    assert "is invalid: strategy: unknown strategy 'fedavgg'" in message
