"""Training-time augmentation of chest X-ray batches: small random affine moves.

Each image of a training batch gets its own rotation (up to
``max_rotation_degrees``), isotropic scaling (up to ``max_scale`` either way)
and translation (up to ``max_translation`` of the image size), applied with
MONAI's batched ``AffineTransform`` (bilinear, zero padding). These match how
a patient's position and distance to the detector vary between exposures.

No flips: a chest radiograph has a fixed left-right anatomy (the heart on the
patient's left, the stomach bubble under the left hemidiaphragm), so a
mirrored image is not a plausible X-ray and can teach the model a
dextrocardia-like pattern. Augmentation draws from the site's training
generator and is a per-sample transformation, so it changes neither the
per-sample gradient clipping nor the privacy accounting of DP-SGD.
"""

import math
from dataclasses import dataclass

import torch
from monai.networks.layers import AffineTransform

from medfed.errors import ConfigError

__all__ = ["RandomAffine"]


@dataclass(frozen=True)
class RandomAffine:
    """Random rotation, scaling and translation of image batches (B, C, H, W)."""

    max_rotation_degrees: float = 10.0
    max_scale: float = 0.1
    max_translation: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.max_rotation_degrees <= 180:
            raise ConfigError(
                "max_rotation_degrees must be in [0, 180], got "
                f"{self.max_rotation_degrees}"
            )
        if not 0 <= self.max_scale < 1:
            raise ConfigError(f"max_scale must be in [0, 1), got {self.max_scale}")
        if not 0 <= self.max_translation <= 0.5:
            raise ConfigError(
                f"max_translation must be in [0, 0.5], got {self.max_translation}"
            )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return a randomly moved copy of ``images`` (B, C, H, W), same shape."""
        batch = images.shape[0]
        if batch == 0:
            return images.clone()
        draws = torch.rand(batch, 4, generator=generator, dtype=images.dtype) * 2 - 1
        angle = draws[:, 0] * math.radians(self.max_rotation_degrees)
        scale = 1 + draws[:, 1] * self.max_scale
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # Normalized coordinates span [-1, 1], so a shift of t image widths is 2t.
        shift = draws[:, 2:] * 2 * self.max_translation
        theta = torch.stack(
            [
                torch.stack([cos, -sin, shift[:, 0]], dim=1),
                torch.stack([sin, cos, shift[:, 1]], dim=1),
            ],
            dim=1,
        )
        transform = AffineTransform(normalized=True, padding_mode="zeros")
        return transform(images, theta, spatial_size=images.shape[2:])
