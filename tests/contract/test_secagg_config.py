"""The secure_aggregation config section and its config-time checks."""

import pytest
from pydantic import ValidationError

from medfed.contract.config import parse_study_config
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.errors import ConfigError


def test_default_is_none():
    config = SecureAggregationConfig()

    config.check(site_count=2)

    assert config.mode == "none"


def test_masking_defaults_fit_twenty_sites():
    config = SecureAggregationConfig(mode="masking", max_weight=1000)

    config.check(site_count=20)

    assert config.resolved_threshold(20) == 11
    assert config.encoding(20).ring_bits == 32


def test_masking_wraparound_rejected():
    config = SecureAggregationConfig(mode="masking", fractional_bits=16)

    with pytest.raises(ConfigError) as error:
        config.check(site_count=20)

    message = str(error.value)
    assert message.startswith("secure_aggregation (mode 'masking'): the masked sum")
    assert "fractional_bits of at most 10 fits" in message


def test_masking_low_threshold_rejected():
    config = SecureAggregationConfig(mode="masking", threshold=5)

    with pytest.raises(ConfigError) as error:
        config.check(site_count=10)

    assert str(error.value) == (
        "secure_aggregation (mode 'masking'): threshold must be more than half of "
        "the 10 sites, got 5"
    )


def test_ckks_overflow_rejected():
    config = SecureAggregationConfig(mode="ckks", scale_bits=50, max_weight=100_000)

    with pytest.raises(ConfigError, match=r"mode 'ckks'.*can overflow"):
        config.check(site_count=20)


def test_unknown_key_rejected():
    with pytest.raises(ValidationError) as error:
        SecureAggregationConfig.model_validate({"mode": "masking", "treshold": 3})

    assert "treshold" in str(error.value)
    assert "Extra inputs are not permitted" in str(error.value)


def test_unknown_mode_rejected():
    with pytest.raises(ValidationError) as error:
        SecureAggregationConfig.model_validate({"mode": "paillier"})

    assert "'none', 'masking' or 'ckks'" in str(error.value)


STUDY = {
    "study": "heart",
    "data": {"dataset": "heart_disease"},
    "sites": [{"id": f"site-{index}"} for index in range(4)],
    "model": {"name": "logistic_regression", "params": {"in_features": 15}},
    "training": {"rounds": 1, "learning_rate": 0.1},
}


def test_study_default_is_none():
    config = parse_study_config(STUDY)

    assert config.secure_aggregation.mode == "none"


def test_study_mode_shorthand():
    config = parse_study_config(STUDY | {"secure_aggregation": "masking"})

    assert config.secure_aggregation.mode == "masking"
    assert config.secure_aggregation.resolved_threshold(4) == 3


def test_study_rejects_wraparound_with_key():
    raw = STUDY | {"secure_aggregation": {"mode": "masking", "fractional_bits": 20}}

    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)

    message = str(error.value)
    assert "secure_aggregation (mode 'masking'): the masked sum can wrap" in message
    assert "fractional_bits of at most 12 fits" in message


def test_study_rejects_unknown_mode():
    with pytest.raises(ConfigError) as error:
        parse_study_config(STUDY | {"secure_aggregation": "paillier"})

    assert str(error.value) == (
        "study config is invalid: secure_aggregation.mode: Input should be 'none', "
        "'masking' or 'ckks' (got 'paillier')"
    )


def test_study_accepts_ckks():
    config = parse_study_config(STUDY | {"secure_aggregation": "ckks"})

    assert config.secure_aggregation.mode == "ckks"
    assert config.secure_aggregation.ckks_parameters().slot_count == 4096


def test_study_rejects_ckks_overflow():
    secure = {"mode": "ckks", "scale_bits": 50, "max_weight": 100_000}

    with pytest.raises(ConfigError) as error:
        parse_study_config(STUDY | {"secure_aggregation": secure})

    assert "secure_aggregation (mode 'ckks'): the CKKS sum can overflow" in str(
        error.value
    )


def test_study_rejects_robust_rule_under_ckks():
    raw = STUDY | {
        "secure_aggregation": "ckks",
        "strategy": {"name": "fedavg", "wrappers": [{"name": "median"}]},
    }

    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)

    assert "median needs each site's update, but ckks secure aggregation" in str(
        error.value
    )


def test_study_rejects_lossy_codec_under_masking():
    raw = STUDY | {
        "secure_aggregation": "masking",
        "compression": {"codec": "topk", "params": {"fraction": 0.1}},
    }

    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)

    assert "compression (codec 'topk')" in str(error.value)


def test_key_exchange_defaults_to_round_deadline_cap():
    config = SecureAggregationConfig(mode="masking")

    assert config.resolved_key_exchange_seconds(600) == 300
    assert config.resolved_key_exchange_seconds(60) == 60


def test_study_accepts_key_exchange_seconds():
    secure = {"mode": "masking", "key_exchange_seconds": 30}

    config = parse_study_config(STUDY | {"secure_aggregation": secure})

    assert config.secure_aggregation.resolved_key_exchange_seconds(600) == 30


def test_study_rejects_key_exchange_above_deadline():
    raw = STUDY | {
        "secure_aggregation": {"mode": "masking", "key_exchange_seconds": 900},
        "round": {"deadline_seconds": 600},
    }

    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)

    assert str(error.value) == (
        "study config is invalid: secure_aggregation.key_exchange_seconds is "
        "900 s, above the round deadline of 600 s (round.deadline_seconds); set "
        "it to at most 600 or raise round.deadline_seconds"
    )


@pytest.mark.parametrize("seconds", [0, -5, float("inf")])
def test_study_rejects_nonpositive_key_exchange(seconds):
    secure = {"mode": "masking", "key_exchange_seconds": seconds}

    with pytest.raises(ConfigError) as error:
        parse_study_config(STUDY | {"secure_aggregation": secure})

    assert "secure_aggregation.key_exchange_seconds: " in str(error.value)
