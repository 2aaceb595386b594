"""Fixed-point ring encoding and the wrap-around check."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.contract.secagg.ring import (
    FixedPointEncoding,
    check_ring_capacity,
    decode_fixed_point,
    encode_fixed_point,
    from_ring,
    to_ring,
)
from medfed.errors import ConfigError, SecureAggregationError


def ring_sum(vectors: list[np.ndarray], ring_bits: int) -> np.ndarray:
    total = to_ring(np.zeros_like(vectors[0]), ring_bits)
    for vector in vectors:
        total += to_ring(vector, ring_bits)
    return from_ring(total)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    site_count=st.integers(3, 20),
    length=st.integers(1, 40),
    ring_bits=st.sampled_from([32, 64]),
)
def test_integer_inputs_sum_exactly(data, site_count, length, ring_bits):
    encoding = FixedPointEncoding(
        fractional_bits=8,
        clip=100.0,
        max_weight=50,
        site_count=site_count,
        ring_bits=ring_bits,
    )
    values = [
        np.array(
            data.draw(
                st.lists(st.integers(-100, 100), min_size=length, max_size=length)
            )
        )
        for _ in range(site_count)
    ]
    weights = data.draw(
        st.lists(st.integers(1, 50), min_size=site_count, max_size=site_count)
    )
    encoded = [
        encode_fixed_point(value, weight=weight, encoding=encoding)
        for value, weight in zip(values, weights, strict=True)
    ]

    decoded = decode_fixed_point(ring_sum(encoded, ring_bits), encoding)

    expected = sum(
        value * weight for value, weight in zip(values, weights, strict=True)
    )
    np.testing.assert_array_equal(decoded, expected)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    site_count=st.integers(3, 20),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    fractional_bits=st.integers(4, 14),
)
def test_float_inputs_within_bound(data, site_count, rounding, fractional_bits):
    encoding = FixedPointEncoding(
        fractional_bits=fractional_bits,
        clip=2.0,
        max_weight=1000,
        site_count=site_count,
        rounding=rounding,
    )
    floats = st.floats(-3.0, 3.0, allow_nan=False, width=32)
    values = [
        np.array(data.draw(st.lists(floats, min_size=8, max_size=8)))
        for _ in range(site_count)
    ]
    weights = data.draw(
        st.lists(st.integers(1, 1000), min_size=site_count, max_size=site_count)
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    encoded = [
        encode_fixed_point(value, weight=weight, encoding=encoding, rng=rng)
        for value, weight in zip(values, weights, strict=True)
    ]

    decoded = decode_fixed_point(ring_sum(encoded, 32), encoding)

    expected = sum(
        np.clip(value, -2.0, 2.0) * weight
        for value, weight in zip(values, weights, strict=True)
    )
    assert np.max(np.abs(decoded - expected)) <= encoding.error_bound(site_count)


def test_stochastic_rounding_unbiased():
    encoding = FixedPointEncoding(
        fractional_bits=2, clip=1.0, max_weight=1, site_count=3, rounding="stochastic"
    )
    value = np.full(200_000, 0.1)
    rng = np.random.default_rng(7)

    encoded = encode_fixed_point(value, weight=1, encoding=encoding, rng=rng)

    mean = decode_fixed_point(encoded, encoding).mean()
    # Standard error of the mean is about 0.25 * 0.5 / sqrt(200_000) = 3e-4.
    assert abs(mean - 0.1) < 2e-3


def test_extremes_at_capacity_do_not_wrap():
    encoding = FixedPointEncoding(
        fractional_bits=10, clip=1.0, max_weight=1000, site_count=20
    )
    for sign in (1.0, -1.0):
        encoded = [
            encode_fixed_point(np.array([sign * 5.0]), weight=1000, encoding=encoding)
            for _ in range(20)
        ]

        decoded = decode_fixed_point(ring_sum(encoded, 32), encoding)

        assert decoded[0] == sign * 20 * 1000


def test_ring_round_trip_signed():
    integers = np.array([-(2**31), -1, 0, 1, 2**31 - 1])

    assert np.array_equal(from_ring(to_ring(integers, 32)), integers)
    assert to_ring(integers, 32).dtype == np.uint32


def test_capacity_rejects_wraparound():
    with pytest.raises(ConfigError) as error:
        check_ring_capacity(
            fractional_bits=16,
            clip=1.0,
            max_weight=100_000,
            site_count=20,
            ring_bits=32,
        )

    message = str(error.value)
    assert "can wrap around the 2^32 ring" in message
    assert "site_count 20" in message
    assert "max_weight 100000" in message
    assert "fractional_bits of at most 10 fits" in message


def test_capacity_boundary():
    # 3 * (2^29 + 1) stays below 2^31 only when 2^29 + 1 < 2^31 / 3.
    check_ring_capacity(
        fractional_bits=28, clip=1.0, max_weight=2, site_count=3, ring_bits=32
    )
    with pytest.raises(ConfigError, match="reaches the ring limit 2\\^31"):
        check_ring_capacity(
            fractional_bits=29, clip=1.0, max_weight=2, site_count=3, ring_bits=32
        )


def test_capacity_without_fitting_scale():
    with pytest.raises(ConfigError) as error:
        check_ring_capacity(
            fractional_bits=0, clip=1e6, max_weight=10_000, site_count=20, ring_bits=32
        )

    assert "no fractional_bits fits, so lower clip, max_weight or site_count" in str(
        error.value
    )


def test_capacity_rejects_float_precision_loss():
    with pytest.raises(ConfigError, match="would exceed 2\\^53 and lose precision"):
        check_ring_capacity(
            fractional_bits=40, clip=1.0, max_weight=100_000, site_count=3, ring_bits=64
        )


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"ring_bits": 16}, "ring_bits must be 32 or 64, got 16"),
        (
            {"fractional_bits": -1},
            "fractional_bits must be an integer from 0 to 52, got -1",
        ),
        ({"clip": float("nan")}, "clip must be a positive finite number, got nan"),
        ({"clip": 0}, "clip must be a positive finite number, got 0"),
        (
            {"max_weight": 0},
            "max_weight must be a positive integer sample count, got 0",
        ),
        ({"site_count": 0}, "site_count must be a positive integer, got 0"),
    ],
)
def test_capacity_rejects_invalid_parameter(parameters, message):
    arguments = {
        "fractional_bits": 8,
        "clip": 1.0,
        "max_weight": 10,
        "site_count": 3,
        "ring_bits": 32,
    } | parameters

    with pytest.raises(ConfigError) as error:
        check_ring_capacity(**arguments)

    assert str(error.value) == message


def test_encoding_rejects_unknown_rounding():
    with pytest.raises(ConfigError, match="rounding must be 'nearest' or 'stochastic'"):
        FixedPointEncoding(
            fractional_bits=8, clip=1.0, max_weight=10, site_count=3, rounding="up"
        )


def test_encode_rejects_weight_above_max():
    encoding = FixedPointEncoding(
        fractional_bits=8, clip=1.0, max_weight=10, site_count=3
    )

    with pytest.raises(SecureAggregationError) as error:
        encode_fixed_point(np.zeros(3), weight=11, encoding=encoding)

    assert "weight must be an integer from 1 to max_weight 10, got 11" in str(
        error.value
    )


def test_encode_rejects_nan():
    encoding = FixedPointEncoding(
        fractional_bits=8, clip=1.0, max_weight=10, site_count=3
    )

    with pytest.raises(SecureAggregationError, match="contains NaN or infinite values"):
        encode_fixed_point(np.array([0.0, np.nan]), weight=1, encoding=encoding)
