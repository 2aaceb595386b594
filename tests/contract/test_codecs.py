"""Round trips, parameter checks and decoder checks shared by every codec."""

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medfed.contract.codecs import CODECS, get_codec, randk
from medfed.contract.codecs.fp16 import FLOAT16_MAX
from medfed.contract.codecs.lowbit import level_max
from medfed.contract.codecs.params import kept_count
from medfed.contract.codecs.randk import random_positions
from medfed.contract.wire import decode_envelope, encode_envelope
from medfed.errors import ConfigError, EnvelopeError

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


def float32_tensors(max_magnitude: float = 1e4) -> st.SearchStrategy[np.ndarray]:
    """Float32 tensors of any small shape, including 0-d, empty and 1-element."""
    return hnp.arrays(
        np.float32,
        SHAPES,
        elements=st.floats(-max_magnitude, max_magnitude, width=32),
    )


def updates(max_magnitude: float = 1e4) -> st.SearchStrategy[dict[str, np.ndarray]]:
    return st.dictionaries(
        st.sampled_from(["w", "b", "layer.0.weight", "bias"]),
        float32_tensors(max_magnitude),
        min_size=1,
        max_size=3,
    )


def round_trip(name: str, params: dict, update: dict[str, np.ndarray]) -> dict:
    """Encode with one codec instance and decode with one built from its params."""
    encoder = get_codec(name, params)
    payload = encoder.encode(update)
    decoder = get_codec(name, encoder.params)
    specs = [(key, np.shape(value), "float32") for key, value in update.items()]
    return decoder.decode(payload, specs)


def test_registry_has_all_codecs():
    assert set(CODECS) >= {"fp32", "fp16", "int8", "lowbit", "topk", "randk"}


@given(updates())
def test_fp32_round_trip_is_exact(update):
    decoded = round_trip("fp32", {}, update)
    for key, value in update.items():
        assert decoded[key].shape == value.shape
        assert np.array_equal(decoded[key], value)


@given(updates(max_magnitude=FLOAT16_MAX))
def test_fp16_round_trip_within_bound(update):
    decoded = round_trip("fp16", {}, update)
    for key, value in update.items():
        assert decoded[key].shape == value.shape
        assert decoded[key].dtype == np.float32
        exact = value.astype(np.float64)
        error = np.abs(decoded[key].astype(np.float64) - exact)
        bound = np.maximum(np.abs(exact) * 2.0**-11, 2.0**-25)
        assert (error <= bound).all()


def test_fp16_rejects_overflow():
    codec = get_codec("fp16")
    with pytest.raises(EnvelopeError, match=r"above the float16 maximum 65504"):
        codec.encode({"w": np.array([1.0, 70000.0], np.float32)})


@pytest.mark.parametrize("chunk_size", [0, 1, 3, 64])
@given(update=updates(), seed=st.integers(0, 2**32))
@settings(max_examples=60)
def test_int8_round_trip_within_scale(chunk_size, update, seed):
    codec = get_codec("int8", {"chunk_size": chunk_size, "seed": seed})
    payload = codec.encode(update)
    specs = [(key, np.shape(value), "float32") for key, value in update.items()]
    decoded = get_codec("int8", codec.params).decode(payload, specs)
    for key, value in update.items():
        scales = payload[f"{key}.scale"]
        chunk = chunk_size or max(value.size, 1)
        per_element = np.repeat(scales.astype(np.float64), chunk)[: value.size]
        exact = value.reshape(-1).astype(np.float64)
        error = np.abs(decoded[key].reshape(-1).astype(np.float64) - exact)
        # |error| < scale, plus the float32 rounding of q * scale.
        assert (error <= per_element + np.abs(exact) * 2.0**-23).all()
        assert decoded[key].shape == value.shape
        assert payload[f"{key}.q"].dtype == np.int8
        assert scales.size == (1 if chunk_size == 0 else math.ceil(value.size / chunk))


@pytest.mark.parametrize("step_rms", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("chunk_size", [0, 3, 64])
@given(update=updates(), seed=st.integers(0, 2**32))
@settings(max_examples=40)
def test_int8_step_rms_within_scale(step_rms, chunk_size, update, seed):
    params = {"chunk_size": chunk_size, "step_rms": step_rms, "seed": seed}
    codec = get_codec("int8", params)
    payload = codec.encode(update)
    specs = [(key, np.shape(value), "float32") for key, value in update.items()]
    decoded = get_codec("int8", codec.params).decode(payload, specs)
    for key, value in update.items():
        exact = value.reshape(-1).astype(np.float64)
        chunk = chunk_size or max(value.size, 1)
        scales = payload[f"{key}.scale"].astype(np.float64)
        for index, scale in enumerate(scales):
            part = exact[index * chunk : (index + 1) * chunk]
            if part.size:
                rms = math.sqrt(np.mean(np.square(part)))
                # The step is at least step_rms * rms and never clips.
                assert scale >= step_rms * rms * (1 - 2.0**-23)
                assert scale * 127 >= np.abs(part).max()
        per_element = np.repeat(scales, chunk)[: value.size]
        error = np.abs(decoded[key].reshape(-1).astype(np.float64) - exact)
        assert (error <= per_element + np.abs(exact) * 2.0**-23).all()


def test_int8_step_rms_gaussian_levels():
    values = np.random.default_rng(3).standard_normal(50_000).astype(np.float32)
    codec = get_codec("int8", {"chunk_size": 4096, "step_rms": 1.0, "seed": 1})

    levels = codec.encode({"w": values})["w.q"]

    # At a step of one standard deviation, |level| > 5 needs a value beyond
    # 5 standard deviations (probability 6e-7 each).
    assert int(np.abs(levels).max()) <= 5
    assert codec.params == {"chunk_size": 4096, "step_rms": 1.0}


def test_int8_step_rms_zstd_bytes():
    # A DP-noised update is close to Gaussian. These are the settings of the
    # DP pneumonia study in docs/benchmarks-compression.md.
    rng = np.random.default_rng(5)
    update = {
        f"layer{index}.weight": rng.standard_normal(shape).astype(np.float32) * 0.01
        for index, shape in enumerate([(64, 64, 3, 3), (32, 32, 3, 3), (64,), (2, 64)])
    }
    common = {
        "study": "study",
        "round_number": 1,
        "site": "site-a",
        "sample_count": 10,
        "nonce": "ab" * 8,
    }
    fp32 = encode_envelope(update, **common)
    int8 = encode_envelope(
        update,
        **common,
        codec_name="int8",
        codec_params={"chunk_size": 4096, "step_rms": 1.0, "seed": 2},
        compression="zstd",
        zstd_level=19,
    )

    assert len(fp32) / len(int8) >= 10
    decoded = decode_envelope(int8)
    assert decoded.header.codec.params == {"chunk_size": 4096, "step_rms": 1.0}


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_int8_step_rms_near_float32_max(chunk_size):
    """At step_rms 127, values above 2.7e36 would need a scale past the
    largest float32; the scale is capped there, so the envelope decodes."""
    largest = float(np.finfo(np.float32).max)
    values = np.array([3e38, -3e38, largest, 1e37, 0.0, 1.0, 2e36, -1e38], "f4")
    params = {"chunk_size": chunk_size, "step_rms": 127.0, "seed": 4}

    payload = get_codec("int8", params).encode({"w": values})
    envelope = encode_envelope(
        {"w": values},
        study="study",
        round_number=1,
        site="site-a",
        sample_count=10,
        nonce="ab" * 8,
        codec_name="int8",
        codec_params=params,
    )

    assert np.isfinite(payload["w.scale"]).all()
    assert (payload["w.scale"] <= largest).all()
    decoded = decode_envelope(envelope).tensors["w"]
    assert np.isfinite(decoded).all()


@given(update=updates(max_magnitude=1.0), seed=st.integers(0, 2**32))
@settings(max_examples=60)
def test_int8_shared_scale_within_scale(update, seed):
    scale = 1.0 / 127
    decoded = round_trip("int8", {"scale": scale, "seed": seed}, update)
    for key, value in update.items():
        error = np.abs(decoded[key].astype(np.float64) - value.astype(np.float64))
        assert (error <= np.float32(scale) * (1 + 2.0**-23)).all()


def test_int8_shared_scale_clips():
    decoded = round_trip("int8", {"scale": 0.01}, {"w": np.array([5.0, -5.0], "f4")})
    assert np.allclose(decoded["w"], [1.27, -1.27])


def test_int8_seed_reproduces_payload():
    update = {"w": np.linspace(-1, 1, 50, dtype=np.float32)}
    first = get_codec("int8", {"seed": 7}).encode(update)
    second = get_codec("int8", {"seed": 7}).encode(update)
    assert np.array_equal(first["w.q"], second["w.q"])


def kept_mask(payload: dict, key: str, size: int) -> np.ndarray:
    """Return the kept positions of a topk tensor as a boolean mask."""
    if f"{key}.bitmap" in payload:
        bitmap = payload[f"{key}.bitmap"]
        assert bitmap.dtype == np.uint8
        assert bitmap.shape == (math.ceil(size / 8),)
        bits = np.unpackbits(bitmap, bitorder="little")
        assert not bits[size:].any()
        return bits[:size].astype(bool)
    indices = payload[f"{key}.indices"]
    assert indices.dtype == np.int32
    assert (np.diff(indices) > 0).all()
    kept = np.zeros(size, dtype=bool)
    kept[indices] = True
    return kept


def check_kept_values(decoded, exact, payload, key, value_dtype):
    """Assert the error bound of topk's kept values for ``value_dtype``."""
    if value_dtype == "float32":
        assert np.array_equal(decoded, exact)
    elif value_dtype == "float16":
        error = np.abs(decoded - exact)
        assert (error <= np.maximum(np.abs(exact) * 2.0**-11, 2.0**-25)).all()
    else:
        assert payload[f"{key}.values"].dtype == np.int8
        scale = np.float64(payload[f"{key}.scale"][0])
        peak = float(np.abs(exact).max()) if exact.size else 0.0
        # The scale is the least float32 at or above max|kept| / 127.
        below = np.float64(np.nextafter(np.float32(scale), np.float32(0)))
        assert scale * 127 >= peak
        assert scale == 0 or below * 127 < peak
        error = np.abs(decoded.astype(np.float64) - exact.astype(np.float64))
        # |error| < scale, plus the float32 rounding of q * scale.
        assert (error <= scale + np.abs(exact) * 2.0**-23).all()


@pytest.mark.parametrize("index_encoding", ["int32", "bitmap"])
@pytest.mark.parametrize("value_dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
@given(update=updates(max_magnitude=1e3), seed=st.integers(0, 2**32))
@settings(max_examples=30)
def test_topk_keeps_largest_values(index_encoding, value_dtype, fraction, update, seed):
    params = {
        "fraction": fraction,
        "value_dtype": value_dtype,
        "index_encoding": index_encoding,
    }
    codec = get_codec("topk", params | {"seed": seed})
    payload = codec.encode(update)
    specs = [(key, np.shape(value), "float32") for key, value in update.items()]
    decoded = get_codec("topk", codec.params).decode(payload, specs)
    for key, value in update.items():
        flat = value.reshape(-1)
        out = decoded[key].reshape(-1)
        kept = kept_mask(payload, key, flat.size)
        expected_count = (
            0 if flat.size == 0 else max(1, math.floor(fraction * flat.size + 0.5))
        )
        assert decoded[key].shape == value.shape
        assert int(kept.sum()) == min(expected_count, flat.size)
        assert payload[f"{key}.values"].shape == (int(kept.sum()),)
        assert (out[~kept] == 0).all()
        check_kept_values(out[kept], flat[kept], payload, key, value_dtype)
        if kept.any() and (~kept).any():
            assert np.abs(flat[~kept]).max() <= np.abs(flat[kept]).min()


def test_topk_params_name_bitmap_only():
    """The default int32 form keeps the header it had before bitmaps."""
    assert get_codec("topk", {"fraction": 0.1}).params == {
        "fraction": 0.1,
        "value_dtype": "float32",
    }
    bitmap = get_codec("topk", {"fraction": 0.1, "index_encoding": "bitmap"})
    assert bitmap.params["index_encoding"] == "bitmap"


def test_topk_bitmap_bit_order_little():
    codec = get_codec("topk", {"fraction": 0.2, "index_encoding": "bitmap"})
    update = {"w": np.array([9, 0, 0, 0, 0, 0, 0, 0, 0, -8], np.float32)}
    payload = codec.encode(update)
    # Element 0 is bit 0 of byte 0, element 9 is bit 1 of byte 1.
    assert payload["w.bitmap"].tolist() == [0b00000001, 0b00000010]
    assert payload["w.values"].tolist() == [9.0, -8.0]


@pytest.mark.parametrize(
    ("value_dtype", "expected_bytes"),
    [("int8", 125 + 100 + 4), ("float16", 125 + 200), ("float32", 125 + 400)],
)
def test_topk_bitmap_payload_bytes(value_dtype, expected_bytes):
    params = {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": value_dtype}
    update = {"w": np.random.default_rng(0).normal(size=1000).astype(np.float32)}
    payload = get_codec("topk", params).encode(update)
    assert sum(array.nbytes for array in payload.values()) == expected_bytes


def test_topk_int8_values_seed_reproduces_payload():
    params = {"fraction": 0.5, "value_dtype": "int8", "seed": 4}
    update = {"w": np.linspace(-1, 1, 50, dtype=np.float32)}
    first = get_codec("topk", params).encode(update)
    second = get_codec("topk", params).encode(update)
    assert np.array_equal(first["w.values"], second["w.values"])


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("chunk_size", [0, 1, 3, 64])
@given(update=updates(), seed=st.integers(0, 2**32))
@settings(max_examples=40)
def test_lowbit_round_trip_within_scale(bits, chunk_size, update, seed):
    codec = get_codec("lowbit", {"bits": bits, "chunk_size": chunk_size, "seed": seed})
    payload = codec.encode(update)
    specs = [(key, np.shape(value), "float32") for key, value in update.items()]
    decoded = get_codec("lowbit", codec.params).decode(payload, specs)
    for key, value in update.items():
        scales = payload[f"{key}.scale"].astype(np.float64)
        chunk = chunk_size or max(value.size, 1)
        per_element = np.repeat(scales, chunk)[: value.size]
        exact = value.reshape(-1).astype(np.float64)
        error = np.abs(decoded[key].reshape(-1).astype(np.float64) - exact)
        assert decoded[key].shape == value.shape
        assert decoded[key].dtype == np.float32
        # |error| < scale, plus the float32 rounding of q * scale.
        assert (error <= per_element + np.abs(exact) * 2.0**-23).all()
        # No value is clipped: each scale covers its chunk's largest magnitude.
        assert (per_element * level_max(bits) >= np.abs(exact)).all()
        assert payload[f"{key}.codes"].dtype == np.uint8
        assert payload[f"{key}.codes"].shape == (math.ceil(value.size * bits / 8),)
        assert scales.size == (1 if chunk_size == 0 else math.ceil(value.size / chunk))


@pytest.mark.parametrize(
    ("bits", "levels", "packed"),
    [
        # Levels 1, 0, -1, 1, 1 are codes 2, 1, 0, 2, 2, four to a byte.
        (2, [1, 0, -1, 1, 1], [2 | 1 << 2 | 0 << 4 | 2 << 6, 2]),
        # Levels 7, -7, 0 are codes 14, 0, 7, two to a byte.
        (4, [7, -7, 0], [14 | 0 << 4, 7]),
        (8, [127, -127, 3], [254, 0, 130]),
    ],
)
def test_lowbit_packing_layout(bits, levels, packed):
    """Values on a level at scale 0.5 round to that level, so the bytes are fixed."""
    update = {"w": np.array(levels, np.float32) * np.float32(0.5)}
    payload = get_codec("lowbit", {"bits": bits}).encode(update)
    assert payload["w.codes"].tolist() == packed
    assert payload["w.scale"].tolist() == [0.5]


@pytest.mark.parametrize(("bits", "expected_bytes"), [(8, 1004), (4, 504), (2, 254)])
def test_lowbit_payload_bytes(bits, expected_bytes):
    update = {"w": np.random.default_rng(0).normal(size=1000).astype(np.float32)}
    payload = get_codec("lowbit", {"bits": bits}).encode(update)
    assert sum(array.nbytes for array in payload.values()) == expected_bytes


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
@given(update=updates(max_magnitude=1e3), seed=st.integers(0, 2**63 - 1))
@settings(max_examples=40)
def test_randk_unscaled_keeps_exact_values(fraction, update, seed):
    params = {"fraction": fraction, "seed": seed, "rescale": False}
    decoded = round_trip("randk", params, update)
    for key, value in update.items():
        flat = value.reshape(-1)
        out = decoded[key].reshape(-1)
        assert decoded[key].shape == value.shape
        assert ((out == flat) | (out == 0)).all()


@given(update=updates(max_magnitude=1e3), seed=st.integers(0, 2**63 - 1))
@settings(max_examples=40)
def test_randk_rescales_by_size_over_kept(update, seed):
    params = {"fraction": 0.25, "seed": seed}
    codec = get_codec("randk", params)
    payload = codec.encode(update)
    for key, value in update.items():
        kept = payload[f"{key}.values"].size
        if kept:
            # The kept positions are where the decoded tensor is non-zero,
            # unless the original value there was zero.
            decoded = round_trip("randk", params, {key: value})[key].reshape(-1)
            flat = value.reshape(-1).astype(np.float64)
            ratio = value.size / kept
            nonzero = decoded != 0
            assert np.allclose(decoded[nonzero], flat[nonzero] * ratio, rtol=1e-6)


def test_randk_draws_fresh_seed_per_encode():
    codec = get_codec("randk", {"fraction": 0.1})
    update = {"w": np.arange(1000, dtype=np.float32)}
    codec.encode(update)
    first = codec.params["seed"]
    codec.encode(update)
    assert codec.params["seed"] != first


def test_randk_decoder_requires_seed():
    codec = get_codec("randk", {"fraction": 0.5})
    with pytest.raises(EnvelopeError, match="lack the seed"):
        codec.decode({"w.values": np.zeros(1, np.float32)}, [("w", (2,), "float32")])


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fp32", {}),
        ("fp16", {}),
        ("int8", {"chunk_size": 4}),
        ("int8", {"scale": 0.5}),
        ("int8", {"chunk_size": 16, "step_rms": 1.0}),
        ("topk", {"fraction": 0.3, "value_dtype": "float16"}),
        ("topk", {"fraction": 0.3, "index_encoding": "bitmap", "value_dtype": "int8"}),
        ("randk", {"fraction": 0.3}),
        ("lowbit", {"bits": 2}),
        ("lowbit", {"bits": 4, "chunk_size": 16}),
    ],
)
def test_envelope_round_trip_per_codec(name, params):
    update = {
        "w": np.linspace(-2, 2, 60, dtype=np.float32).reshape(6, 10),
        "b": np.array(0.25, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    envelope = encode_envelope(
        update,
        study="study",
        round_number=1,
        site="site-a",
        sample_count=10,
        nonce="ab" * 8,
        codec_name=name,
        codec_params=params,
        compression="zstd",
    )
    decoded = decode_envelope(envelope)
    assert decoded.header.codec.name == name
    for key, value in update.items():
        assert decoded.tensors[key].shape == value.shape
        assert decoded.tensors[key].dtype == np.float32


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fp16", {}),
        ("int8", {}),
        ("topk", {"fraction": 0.5}),
        ("topk", {"fraction": 0.5, "index_encoding": "bitmap", "value_dtype": "int8"}),
        ("randk", {"fraction": 0.5}),
        ("lowbit", {"bits": 2}),
    ],
)
def test_encode_rejects_nan(name, params):
    codec = get_codec(name, params)
    with pytest.raises(EnvelopeError, match=r"tensor 'w': it contains NaN or infinite"):
        codec.encode({"w": np.array([1.0, np.nan], np.float32)})


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8"])
def test_encode_rejects_integer_tensor(name):
    with pytest.raises(EnvelopeError, match=r"dtype is int64, expected float32"):
        get_codec(name).encode({"w": np.array([1, 2], np.int64)})


INVALID_PARAMS = [
    ("int8", {"chunk_size": -1}, "parameter chunk_size must be between 0 and"),
    ("int8", {"chunk_size": 2.5}, "parameter chunk_size must be an integer, got 2.5"),
    ("int8", {"chunk_size": True}, "parameter chunk_size must be an integer, got True"),
    ("int8", {"scale": 0}, "parameter scale must be greater than 0.0"),
    ("int8", {"scale": float("nan")}, "parameter scale must be greater than 0.0"),
    ("int8", {"scale": "big"}, "parameter scale must be a number, got 'big'"),
    ("int8", {"scale": 1e-50}, "scale must be representable as a positive float32"),
    (
        "int8",
        {"scale": 0.1, "chunk_size": 8},
        "chunk_size and scale exclude each other",
    ),
    ("int8", {"seed": -3}, "parameter seed must be between 0 and"),
    ("int8", {"step_rms": 0}, "parameter step_rms must be greater than 0.0"),
    ("int8", {"step_rms": 200}, "step_rms must be greater than 0.0 and at most 127"),
    ("int8", {"step_rms": True}, "parameter step_rms must be a number, got True"),
    (
        "int8",
        {"step_rms": 1.0, "scale": 0.01},
        "parameters step_rms and scale exclude each other",
    ),
    ("int8", {"bits": 4}, "codec 'int8' has no parameter 'bits'"),
    ("topk", {}, "codec 'topk' requires parameter fraction"),
    (
        "topk",
        {"fraction": 0},
        "parameter fraction must be greater than 0.0 and at most 1.0, got 0",
    ),
    (
        "topk",
        {"fraction": 1.5},
        "parameter fraction must be greater than 0.0 and at most 1.0, got 1.5",
    ),
    (
        "topk",
        {"fraction": 0.1, "value_dtype": "int4"},
        "value_dtype must be one of float32, float16, int8, got 'int4'",
    ),
    (
        "topk",
        {"fraction": 0.1, "index_encoding": "int16"},
        "index_encoding must be one of int32, bitmap, got 'int16'",
    ),
    ("topk", {"fraction": 0.1, "seed": -1}, "parameter seed must be between 0 and"),
    ("lowbit", {}, "codec 'lowbit' requires parameter bits"),
    ("lowbit", {"bits": 3}, "parameter bits must be one of 8, 4, 2, got 3"),
    ("lowbit", {"bits": 16}, "parameter bits must be between 2 and 8, got 16"),
    ("lowbit", {"bits": 4.0}, "parameter bits must be an integer, got 4.0"),
    ("lowbit", {"bits": True}, "parameter bits must be an integer, got True"),
    ("lowbit", {"bits": 2, "chunk_size": -1}, "parameter chunk_size must be between"),
    ("lowbit", {"bits": 2, "scale": 0.1}, "codec 'lowbit' has no parameter 'scale'"),
    ("randk", {"fraction": 0.1, "seed": 2**63}, "parameter seed must be between 0 and"),
    (
        "randk",
        {"fraction": 0.1, "rescale": 1},
        "parameter rescale must be true or false, got 1",
    ),
    (
        "fp16",
        {"scale": 1},
        "codec 'fp16' has no parameter 'scale': its parameters are none",
    ),
    ("gzip", {}, "unknown codec 'gzip': choose one of"),
]


@pytest.mark.parametrize(("name", "params", "message"), INVALID_PARAMS)
def test_invalid_params_rejected(name, params, message):
    with pytest.raises(ConfigError) as caught:
        get_codec(name, params)
    assert message in str(caught.value)


def reference_positions(seed, name, size, kept):
    """The k smallest of all keys, drawn at once, for comparison."""
    name_hash = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    generator = np.random.PCG64(np.random.SeedSequence([seed, name_hash]))
    keys = generator.random_raw(size)
    return np.sort(np.argpartition(keys, kept - 1)[:kept])


@given(
    seed=st.integers(0, 2**63 - 1),
    size=st.integers(1, 5000),
    fraction=st.floats(0.0001, 1.0),
    block_size=st.integers(1, 3000),
)
def test_randk_positions_match_reference(seed, size, fraction, block_size):
    kept = kept_count(fraction, size)
    positions = random_positions(seed, "w", size, kept, block_size=block_size)
    assert np.array_equal(positions, reference_positions(seed, "w", size, kept))


def test_randk_positions_retry_low_threshold(monkeypatch):
    monkeypatch.setattr(randk, "_initial_threshold", lambda size, kept: 2**40)
    positions = randk.random_positions(5, "w", 3000, 300, block_size=128)
    assert np.array_equal(positions, reference_positions(5, "w", 3000, 300))


def test_randk_positions_pinned_for_seed():
    """Site and service must draw the same positions from a seed, across
    NumPy releases too. These were recorded with NumPy 2.4."""
    positions = random_positions(12345, "layer.weight", 1000, 10)
    assert positions.tolist() == [256, 280, 391, 405, 456, 499, 619, 719, 939, 958]
