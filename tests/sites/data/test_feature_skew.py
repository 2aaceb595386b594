"""Scanner profiles: determinism per site and seed, range and effect."""

import numpy as np
import pytest

from medfed.errors import ConfigError
from medfed.sites.data.feature_skew import (
    ScannerProfile,
    apply_scanner_profile,
    scanner_profile,
)


def test_scanner_profile_repeats_for_site_and_seed():
    first = scanner_profile(site_index=2, seed=5, strength=1.0)
    assert first == scanner_profile(site_index=2, seed=5, strength=1.0)
    assert first != scanner_profile(site_index=3, seed=5, strength=1.0)
    assert first != scanner_profile(site_index=2, seed=6, strength=1.0)


def test_scanner_profile_stays_in_documented_ranges():
    for site in range(50):
        profile = scanner_profile(site_index=site, seed=0, strength=1.0)
        assert 1 / 1.5 <= profile.gamma <= 1.5
        assert 0.75 <= profile.contrast <= 1.25
        assert -0.1 <= profile.brightness <= 0.1


def test_zero_strength_is_identity():
    images = np.random.default_rng(0).random((3, 28, 28)).astype(np.float32)
    profile = scanner_profile(site_index=1, seed=0, strength=0.0)
    assert profile == ScannerProfile()
    assert np.array_equal(apply_scanner_profile(images, profile), images)


def test_scanner_profile_formula_and_clipping():
    images = np.array([0.0, 0.25, 1.0], np.float32)
    profile = ScannerProfile(gamma=2.0, contrast=1.2, brightness=0.1)
    result = apply_scanner_profile(images, profile)
    expected = np.clip(1.2 * (images**2 - 0.5) + 0.6, 0, 1)
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    assert result.dtype == np.float32


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"strength": 1.5}, "strength must be in \\[0, 1\\], got 1.5"),
        ({"site_index": -1}, "site_index must be >= 0, got -1"),
    ],
)
def test_scanner_profile_rejects_invalid_arguments(arguments, message):
    values = {"site_index": 0, "seed": 0, "strength": 0.5}
    values.update(arguments)
    with pytest.raises(ConfigError, match=message):
        scanner_profile(**values)
