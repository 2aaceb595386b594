"""Int8 levels at a shared scale as the ring encoding of a masking round."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.contract.codecs import get_codec
from medfed.contract.config import parse_study_config
from medfed.contract.secagg import (
    FixedPointEncoding,
    Int8RingEncoding,
    VectorLayout,
    from_ring,
)
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.secagg.local import run_masking_round
from medfed.contract.wire import decode_envelope, encode_envelope
from medfed.errors import ConfigError, SecureAggregationError

STUDY = "heart"
SCALE = 0.05
CLIP = 127 * SCALE


def site_names(count: int) -> list[str]:
    return [f"site-{index:02d}" for index in range(count)]


def int8_encoding(site_count: int, **overrides) -> Int8RingEncoding:
    parameters = {
        "scale": SCALE,
        "clip": CLIP,
        "max_weight": 500,
        "site_count": site_count,
    } | overrides
    return Int8RingEncoding(**parameters)


def random_updates(site_count: int, rng: np.random.Generator) -> tuple[dict, dict]:
    # A spread of 4 puts some values beyond the clip of 6.35.
    updates = {
        site: {
            "bias": rng.normal(0.0, 4.0, size=3).astype(np.float32),
            "weight": rng.normal(0.0, 4.0, size=(2, 5)).astype(np.float32),
        }
        for site in site_names(site_count)
    }
    counts = {site: int(rng.integers(1, 501)) for site in updates}
    return updates, counts


def clipped_weighted_sum(updates: dict, counts: dict, sites) -> np.ndarray:
    layout = VectorLayout.of(next(iter(updates.values())))
    return sum(
        np.clip(layout.flatten(updates[site]).astype(np.float64), -CLIP, CLIP)
        * counts[site]
        for site in sites
    )


def expected_integer_sum(
    encoding: Int8RingEncoding, updates: dict, counts: dict, sites, seed: int
) -> np.ndarray:
    """Encode each site with the random draws the round used, in site order."""
    rng = np.random.default_rng(seed)
    layout = VectorLayout.of(next(iter(updates.values())))
    return sum(
        encoding.encode(layout.flatten(updates[site]), weight=counts[site], rng=rng)
        for site in sorted(sites)
    )


@settings(max_examples=12, deadline=None)
@given(
    site_count=st.integers(3, 20),
    seed=st.integers(0, 2**32),
    rounding=st.sampled_from(["stochastic", "nearest"]),
)
def test_masked_sum_decodes_to_sum_of_levels(site_count, seed, rounding):
    updates, counts = random_updates(site_count, np.random.default_rng(seed))
    encoding = int8_encoding(site_count, rounding=rounding)

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=1,
        threshold=site_count // 2 + 1,
        encoding=encoding,
        rng=np.random.default_rng(seed + 1),
    )

    integers = expected_integer_sum(encoding, updates, counts, updates, seed + 1)
    np.testing.assert_array_equal(from_ring(outcome.result.ring_sum), integers)
    np.testing.assert_array_equal(outcome.result.weighted_sum, integers * SCALE)
    total_weight = sum(counts.values())
    assert outcome.result.sample_count == total_weight
    error = np.abs(
        outcome.result.weighted_sum - clipped_weighted_sum(updates, counts, updates)
    )
    # float64 rounding of x / scale and of the decoded product adds ~1e-13
    # relative to the weighted sum, far below the quantization bound.
    assert error.max() <= encoding.error_bound(total_weight) * (1 + 1e-9)
    mean_error = error / total_weight
    limit = SCALE if rounding == "stochastic" else SCALE / 2
    assert mean_error.max() <= limit * (1 + 1e-9)


@pytest.mark.parametrize("site_count", [3, 10, 20])
def test_dropout_sums_survivors_levels(site_count):
    updates, counts = random_updates(site_count, np.random.default_rng(site_count))
    dropped = site_names(site_count)[1]
    encoding = int8_encoding(site_count)

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=2,
        threshold=site_count // 2 + 1,
        encoding=encoding,
        drop_before_upload={dropped},
        rng=np.random.default_rng(7),
    )

    survivors = [site for site in sorted(updates) if site != dropped]
    # The dropped site never encodes, so it draws no random numbers.
    integers = expected_integer_sum(encoding, updates, counts, survivors, 7)
    np.testing.assert_array_equal(from_ring(outcome.result.ring_sum), integers)
    assert outcome.result.survivors == tuple(survivors)
    assert outcome.result.sample_count == sum(counts[site] for site in survivors)


def test_stochastic_levels_unbiased():
    encoding = int8_encoding(3)
    values = np.array([0.3 * SCALE, -2.7 * SCALE, 100.5 * SCALE, CLIP, -CLIP])
    rng = np.random.default_rng(11)
    draws = 20_000

    decoded = np.mean(
        [encoding.decode(encoding.quantize(values, rng=rng)) for _ in range(draws)],
        axis=0,
    )

    # Each level is off by less than one step, so its standard deviation is
    # at most scale / 2, and the mean of the draws at most scale / 2 / sqrt(n).
    tolerance = 5 * SCALE / 2 / np.sqrt(draws)
    np.testing.assert_allclose(decoded, values, rtol=0, atol=tolerance)


def test_levels_stay_within_int8():
    encoding = int8_encoding(3)
    values = np.array([CLIP, -CLIP, 10 * CLIP, -10 * CLIP, np.nextafter(CLIP, 10)])

    for seed in range(50):
        levels = encoding.quantize(values, rng=np.random.default_rng(seed))
        assert levels.max() <= 127
        assert levels.min() >= -127


def test_encode_multiplies_levels_by_weight():
    encoding = int8_encoding(3, rounding="nearest")

    integers = encoding.encode(np.array([1.0, -0.26, 0.0]), weight=40)

    np.testing.assert_array_equal(integers, np.array([20, -5, 0]) * 40)


def test_encode_rejects_weight_beyond_max():
    encoding = int8_encoding(3)

    with pytest.raises(SecureAggregationError) as error:
        encoding.encode(np.zeros(2), weight=501)

    assert str(error.value) == (
        "sample-count weight must be an integer from 1 to max_weight 500, got 501"
    )


def test_encode_rejects_nan():
    encoding = int8_encoding(3)

    with pytest.raises(SecureAggregationError, match="NaN or infinite"):
        encoding.encode(np.array([0.0, np.nan]), weight=1)


def test_capacity_accepts_largest_weight():
    half_ring = 2**31
    largest = (half_ring - 1) // (20 * 127)

    encoding = int8_encoding(20, max_weight=largest)

    assert encoding.max_weight == largest


def test_capacity_rejects_wraparound():
    with pytest.raises(ConfigError) as error:
        int8_encoding(20, max_weight=1_000_000)

    message = str(error.value)
    assert message.startswith("the masked sum can wrap around the 2^32 ring")
    assert "site_count 20 x 127 x max_weight 1000000 = 2540000000" in message
    assert "lower max_weight to at most 845466, or set ring_bits to 64" in message


def test_capacity_in_64_bit_ring():
    encoding = int8_encoding(20, max_weight=1_000_000, ring_bits=64)

    assert encoding.dtype == np.uint64


def test_clip_beyond_int8_range_rejected():
    with pytest.raises(ConfigError) as error:
        int8_encoding(3, clip=10.0)

    message = str(error.value)
    assert "clip 10.0 exceeds the int8 range 127 x scale 0.05" in message
    assert "set the int8 scale to clip / 127 = 0.07874" in message


def test_scale_from_clip_accepted():
    # For 15.89 and 31.77, 127 * (clip / 127) falls one ulp short of clip in
    # float64; the check allows for it.
    for clip in (1.0, 0.3, 15.89, 31.77):
        encoding = Int8RingEncoding(
            scale=clip / 127, clip=clip, max_weight=10, site_count=3
        )
        assert encoding.clip == clip
    assert 127 * (15.89 / 127) < 15.89


def test_invalid_scale_rejected():
    with pytest.raises(ConfigError, match="scale must be a positive finite number"):
        int8_encoding(3, scale=float("inf"))


def test_codec_params_name_int8_scale():
    assert int8_encoding(3).codec_params == {"ring_bits": 32, "int8_scale": SCALE}


def test_masked_envelope_carries_int8_scale():
    encoding = int8_encoding(3)
    ring = {"weight": np.arange(6, dtype=np.uint32).reshape(2, 3)}

    envelope = encode_envelope(
        ring,
        study=STUDY,
        round_number=0,
        site="site-00",
        sample_count=5,
        nonce="00" * 16,
        codec_name="masked",
        codec_params=encoding.codec_params,
    )
    decoded = decode_envelope(envelope)

    assert decoded.header.codec.params == encoding.codec_params
    np.testing.assert_array_equal(decoded.tensors["weight"], ring["weight"])


def test_masked_codec_needs_one_scale():
    with pytest.raises(ConfigError) as both:
        get_codec("masked", {"fractional_bits": 8, "int8_scale": 0.1})
    with pytest.raises(ConfigError) as neither:
        get_codec("masked", {"ring_bits": 32})

    for error in (both, neither):
        assert "needs exactly one of fractional_bits (fixed point) and int8_scale" in (
            str(error.value)
        )


def test_masked_codec_rejects_negative_int8_scale():
    with pytest.raises(ConfigError, match="parameter int8_scale must be greater"):
        get_codec("masked", {"int8_scale": -0.1})


def test_config_selects_encoding_by_codec():
    config = SecureAggregationConfig(mode="masking", clip=1.0, max_weight=1000)

    int8 = config.encoding(4, get_codec("int8", {"scale": 1 / 127}))
    fixed = config.encoding(4, get_codec("fp32"))
    default = config.encoding(4)

    assert isinstance(int8, Int8RingEncoding)
    assert int8.rounding == "stochastic"
    assert int8.scale == 1 / 127
    assert isinstance(fixed, FixedPointEncoding)
    assert fixed.rounding == "nearest"
    assert default == fixed


def test_config_keeps_explicit_rounding_for_int8():
    config = SecureAggregationConfig(mode="masking", rounding="nearest")

    encoding = config.encoding(4, get_codec("int8", {"scale": 1 / 127}))

    assert encoding.rounding == "nearest"


def test_config_rejects_codec_without_ring_encoding():
    config = SecureAggregationConfig(mode="masking")

    with pytest.raises(ConfigError) as error:
        config.encoding(4, get_codec("int8", {"chunk_size": 16}))

    assert str(error.value) == (
        "codec 'int8' with {'chunk_size': 16} has no masking ring encoding; "
        "choose codec fp32, or int8 with a shared scale"
    )


STUDY_CONFIG = {
    "study": "heart",
    "data": {"dataset": "heart_disease"},
    "sites": [{"id": f"site-{index}"} for index in range(4)],
    "model": {"name": "logistic_regression", "params": {"in_features": 15}},
    "training": {"rounds": 1, "learning_rate": 0.1},
}


def test_study_accepts_int8_shared_scale_under_masking():
    raw = STUDY_CONFIG | {
        "secure_aggregation": {"mode": "masking", "clip": 1.0},
        "compression": {"codec": "int8", "params": {"scale": 1 / 127}},
    }

    config = parse_study_config(raw)

    assert config.compression.codec == "int8"
    encoding = config.secure_aggregation.encoding(4, config.compression.build_codec())
    assert isinstance(encoding, Int8RingEncoding)


def test_study_rejects_int8_chunks_under_masking():
    raw = STUDY_CONFIG | {
        "secure_aggregation": "masking",
        "compression": {"codec": "int8", "params": {"chunk_size": 64}},
    }

    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)

    message = str(error.value)
    assert "compression (codec 'int8')" in message
    assert "set the shared scale instead" in message


def test_study_rejects_clip_beyond_int8_range():
    raw = STUDY_CONFIG | {
        "secure_aggregation": {"mode": "masking", "clip": 2.0},
        "compression": {"codec": "int8", "params": {"scale": 1 / 127}},
    }

    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)

    message = str(error.value)
    assert "secure_aggregation (mode 'masking'): clip 2.0 exceeds the int8" in message
    assert "set the int8 scale to clip / 127" in message


def test_study_rejects_int8_wraparound():
    raw = STUDY_CONFIG | {
        "secure_aggregation": {"mode": "masking", "max_weight": 10_000_000},
        "compression": {"codec": "int8", "params": {"scale": 1 / 127}},
    }

    with pytest.raises(ConfigError) as error:
        parse_study_config(raw)

    assert "the masked sum can wrap around the 2^32 ring" in str(error.value)
