"""The secure-aggregation params a study logs to MLflow, for each mode."""

from medfed.contract.codecs import get_codec
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.flows.tracking import secure_aggregation_params


def test_none_logs_mode_only():
    params = secure_aggregation_params(SecureAggregationConfig(), site_count=4)

    assert params == {"secure_aggregation_mode": "none"}


def test_masking_fixed_point_params():
    secure = SecureAggregationConfig(
        mode="masking", clip=10.0, max_weight=1000, fractional_bits=14
    )

    params = secure_aggregation_params(secure, site_count=4, codec=get_codec("fp32"))

    assert params == {
        "secure_aggregation_mode": "masking",
        "secure_aggregation_threshold": 3,
        "secure_aggregation_sites": 4,
        "secure_aggregation_ring_bits": 32,
        "secure_aggregation_clip": 10.0,
        "secure_aggregation_max_weight": 1000,
        "secure_aggregation_rounding": "nearest",
        "secure_aggregation_encoding": "fixed_point",
        "secure_aggregation_fractional_bits": 14,
    }


def test_masking_int8_params():
    secure = SecureAggregationConfig(
        mode="masking", clip=1.0, threshold=4, ring_bits=64
    )

    params = secure_aggregation_params(
        secure, site_count=5, codec=get_codec("int8", {"scale": 1 / 127})
    )

    assert params["secure_aggregation_encoding"] == "int8"
    assert params["secure_aggregation_int8_scale"] == 1 / 127
    assert params["secure_aggregation_rounding"] == "stochastic"
    assert params["secure_aggregation_threshold"] == 4
    assert params["secure_aggregation_ring_bits"] == 64
    assert "secure_aggregation_fractional_bits" not in params


def test_ckks_params():
    secure = SecureAggregationConfig(
        mode="ckks",
        poly_modulus_degree=16384,
        coeff_mod_bit_sizes=(60, 40, 60),
        scale_bits=40,
        clip=2.0,
        max_weight=500,
    )

    params = secure_aggregation_params(secure, site_count=3)

    assert params == {
        "secure_aggregation_mode": "ckks",
        "secure_aggregation_poly_modulus_degree": 16384,
        "secure_aggregation_coeff_mod_bit_sizes": "60,40,60",
        "secure_aggregation_scale_bits": 40,
        "secure_aggregation_clip": 2.0,
        "secure_aggregation_max_weight": 500,
    }


def test_masking_key_exchange_param():
    defaulted = SecureAggregationConfig(mode="masking")
    configured = SecureAggregationConfig(mode="masking", key_exchange_seconds=45)

    default_params = secure_aggregation_params(
        defaulted, site_count=4, deadline_seconds=600
    )
    configured_params = secure_aggregation_params(
        configured, site_count=4, deadline_seconds=600
    )
    short_round_params = secure_aggregation_params(
        defaulted, site_count=4, deadline_seconds=60
    )

    assert default_params["secure_aggregation_key_exchange_seconds"] == 300
    assert configured_params["secure_aggregation_key_exchange_seconds"] == 45
    assert short_round_params["secure_aggregation_key_exchange_seconds"] == 60
