"""The cryptographic source of DP randomness: ChaCha20 draws and their laws."""

import re

import numpy as np
import pytest
from scipy import stats

from medfed import dp_random
from medfed.dp_random import KeyedRandom, derive_key

ZERO_KEY = bytes(32)


def test_keystream_is_standard_chacha20() -> None:
    # RFC 8439, appendix A.1, test vector 1: all-zero key, nonce and counter
    # give the keystream 76 b8 e0 ad a0 f1 3d 90 ...; read little-endian, the
    # first word is 0x903df1a0ade0b876 and its top 53 bits make the draw.
    expected = (0x903DF1A0ADE0B876 >> 11) * 2.0**-53

    assert KeyedRandom(ZERO_KEY).uniform(1)[0] == expected
    # A float32 draw takes the top 24 bits of the first 32-bit word.
    single = KeyedRandom(ZERO_KEY).uniform(1, np.float32)
    assert single.dtype == np.float32
    assert single[0] == (0xADE0B876 >> 8) * 2.0**-24


def test_same_key_replays_and_other_key_differs() -> None:
    first, second = KeyedRandom(ZERO_KEY), KeyedRandom(ZERO_KEY)
    other = KeyedRandom(derive_key(ZERO_KEY, "other"))

    draws = first.gaussian_noise((3, 4), 1.0)

    assert np.array_equal(draws, second.gaussian_noise((3, 4), 1.0))
    assert not np.array_equal(draws, other.gaussian_noise((3, 4), 1.0))
    # Each call continues the stream instead of repeating it.
    assert not np.array_equal(draws, first.gaussian_noise((3, 4), 1.0))


def test_derived_keys_differ_by_label_and_secret() -> None:
    keys = {
        derive_key(ZERO_KEY, "batch sampling"),
        derive_key(ZERO_KEY, "gradient noise"),
        derive_key(b"\x01" * 32, "gradient noise"),
    }

    assert len(keys) == 3
    assert all(len(key) == 32 for key in keys)


def test_fresh_generators_draw_differently() -> None:
    assert not np.array_equal(
        KeyedRandom.from_entropy().uniform(8), KeyedRandom.from_entropy().uniform(8)
    )


@pytest.mark.parametrize(("dtype", "bits"), [(np.float64, 53), (np.float32, 24)])
def test_uniform_draws_lie_on_grid_in_unit_interval(
    dtype: type[np.floating], bits: int
) -> None:
    draws = KeyedRandom(ZERO_KEY).uniform(100_000, dtype)

    assert draws.dtype == dtype
    assert draws.min() >= 0.0
    assert draws.max() < 1.0
    scaled = draws.astype(np.float64) * 2.0**bits
    assert np.array_equal(scaled, np.floor(scaled))
    assert stats.kstest(draws, "uniform").pvalue > 1e-3


def test_other_float_types_rejected() -> None:
    with pytest.raises(ValueError, match="draws are float32 or float64, not float16"):
        KeyedRandom(ZERO_KEY).uniform(4, np.float16)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_standard_normal_follows_normal_law(dtype: type[np.floating]) -> None:
    draws = KeyedRandom(ZERO_KEY).standard_normal(200_001, dtype)

    assert draws.shape == (200_001,)
    assert np.isfinite(draws).all()
    assert stats.kstest(draws, "norm").pvalue > 1e-3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gaussian_noise_has_requested_scale(dtype: type[np.floating]) -> None:
    noise = KeyedRandom(ZERO_KEY).gaussian_noise((400, 500), 0.3, dtype)

    assert noise.shape == (400, 500)
    assert noise.dtype == dtype
    assert abs(noise.mean()) < 0.01 * 0.3
    assert noise.std() == pytest.approx(0.3, rel=0.01)
    assert stats.kstest(noise.ravel() / 0.3, "norm").pvalue > 1e-3


def test_zero_std_gives_zero_noise() -> None:
    assert not KeyedRandom(ZERO_KEY).gaussian_noise((5,), 0.0).any()


@pytest.mark.parametrize("std", [-1.0, float("nan"), float("inf")])
def test_invalid_std_rejected(std: float) -> None:
    with pytest.raises(ValueError, match="noise std must be finite and >= 0"):
        KeyedRandom(ZERO_KEY).gaussian_noise((2,), std)


@pytest.mark.parametrize(("std", "dtype"), [(1e38, np.float32), (1e307, np.float64)])
def test_overflowing_std_rejected(std: float, dtype: type[np.floating]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"noise std {std} would overflow")):
        KeyedRandom(ZERO_KEY).gaussian_noise((2,), std, dtype)


def test_largest_allowed_std_stays_finite() -> None:
    std = float(np.finfo(np.float32).max) / 32

    noise = KeyedRandom(ZERO_KEY).gaussian_noise((100_000,), std, np.float32)

    assert np.isfinite(noise).all()


def test_negative_shape_rejected() -> None:
    with pytest.raises(ValueError, match=r"shape must not be negative, got \(3, -1\)"):
        KeyedRandom(ZERO_KEY).gaussian_noise((3, -1), 1.0)


def test_poisson_sample_keeps_each_index_at_rate() -> None:
    source = KeyedRandom(ZERO_KEY)
    sizes = [len(source.poisson_sample(1000, 0.1)) for _ in range(200)]
    batch = source.poisson_sample(1000, 0.1)

    assert np.mean(sizes) == pytest.approx(100, rel=0.03)
    assert np.all(np.diff(batch) > 0)
    assert batch.min() >= 0
    assert batch.max() < 1000
    assert len(source.poisson_sample(50, 0.0)) == 0
    assert np.array_equal(source.poisson_sample(50, 1.0), np.arange(50))


def test_invalid_rate_rejected() -> None:
    with pytest.raises(ValueError, match=r"sampling rate must be in \[0, 1\], got 1.5"):
        KeyedRandom(ZERO_KEY).poisson_sample(10, 1.5)


def test_short_key_rejected() -> None:
    with pytest.raises(ValueError, match="key must be 32 bytes, got 16"):
        KeyedRandom(bytes(16))


def test_text_key_rejected() -> None:
    with pytest.raises(ValueError, match="key must be 32 bytes, got str; pass"):
        KeyedRandom("a" * 32)  # type: ignore[arg-type]


def test_bytes_like_keys_draw_alike() -> None:
    expected = KeyedRandom(ZERO_KEY).uniform(4)

    assert np.array_equal(KeyedRandom(bytearray(32)).uniform(4), expected)
    assert np.array_equal(KeyedRandom(memoryview(bytes(32))).uniform(4), expected)


@pytest.mark.parametrize("method", ["uniform", "standard_normal"])
def test_negative_count_rejected(method: str) -> None:
    with pytest.raises(ValueError, match="number of draws must be >= 0, got -1"):
        getattr(KeyedRandom(ZERO_KEY), method)(-1)


def test_exhausted_stream_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real limit is 2^38 bytes; a 64-byte limit shows the same check.
    monkeypatch.setattr(dp_random, "_MAX_STREAM_BYTES", 64)
    source = KeyedRandom(ZERO_KEY)
    source.uniform(8)

    with pytest.raises(ValueError, match=r"8 more bytes .* \(64 used\)"):
        source.uniform(1)
