"""The secure_aggregation config section and its config-time checks."""

import pytest
from pydantic import ValidationError

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
