"""Per-site intensity changes that imitate differences between X-ray scanners.

Detectors, exposure settings and post-processing differ between hospitals, so
the same anatomy reaches each site with a different intensity curve. Feature
skew gives every site its own gamma, contrast and brightness, drawn once from
the study seed and the site's index, and applies them to the site's images
(scaled to [0, 1]) before any other preprocessing. ``strength`` 0 leaves the
images unchanged; 1 draws gamma in [0.67, 1.5], contrast in [0.75, 1.25] and
brightness in [-0.1, 0.1].
"""

from dataclasses import asdict, dataclass

import numpy as np

from medfed.errors import ConfigError

__all__ = ["ScannerProfile", "apply_scanner_profile", "scanner_profile"]

_MAX_LOG_GAMMA = float(np.log(1.5))
_MAX_CONTRAST_CHANGE = 0.25
_MAX_BRIGHTNESS = 0.1


@dataclass(frozen=True)
class ScannerProfile:
    """Intensity curve of one site.

    Maps an intensity x in [0, 1] to
    ``clip(contrast * (x**gamma - 0.5) + 0.5 + brightness, 0, 1)``.
    """

    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def scanner_profile(*, site_index: int, seed: int, strength: float) -> ScannerProfile:
    """Draw site ``site_index``'s profile; the same arguments give the same profile.

    Raises:
        ConfigError: ``strength`` is outside [0, 1] or ``site_index`` < 0.
    """
    if not 0 <= strength <= 1:
        raise ConfigError(f"feature_skew strength must be in [0, 1], got {strength}")
    if site_index < 0:
        raise ConfigError(f"site_index must be >= 0, got {site_index}")
    if strength == 0:
        return ScannerProfile()
    rng = np.random.default_rng([seed, site_index])
    log_gamma, contrast, brightness = rng.uniform(-1.0, 1.0, size=3) * strength
    return ScannerProfile(
        gamma=float(np.exp(log_gamma * _MAX_LOG_GAMMA)),
        contrast=float(1.0 + contrast * _MAX_CONTRAST_CHANGE),
        brightness=float(brightness * _MAX_BRIGHTNESS),
    )


def apply_scanner_profile(images: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Return ``images`` (float in [0, 1], any shape) under ``profile``, in [0, 1]."""
    if profile == ScannerProfile():
        return images.astype(np.float32, copy=True)
    curved = np.power(np.clip(images, 0.0, 1.0), profile.gamma, dtype=np.float32)
    shifted = profile.contrast * (curved - 0.5) + 0.5 + profile.brightness
    return np.clip(shifted, 0.0, 1.0).astype(np.float32)
