"""Training-time augmentation: identity when disabled, shape, determinism, errors."""

import pytest
import torch

from medfed.errors import ConfigError
from medfed.sites.data.augment import RandomAffine


def test_random_affine_zero_ranges_is_identity():
    images = torch.rand(4, 1, 28, 28)
    moved = RandomAffine(0, 0, 0)(images)
    torch.testing.assert_close(moved, images, atol=1e-5, rtol=0)


def test_random_affine_keeps_shape_and_repeats_for_seed():
    images = torch.rand(8, 1, 28, 28)
    augment = RandomAffine()
    first = augment(images, torch.Generator().manual_seed(3))
    second = augment(images, torch.Generator().manual_seed(3))
    assert first.shape == images.shape
    assert torch.equal(first, second)
    assert not torch.allclose(first, images)


def test_random_affine_moves_each_image_differently():
    images = torch.rand(1, 1, 28, 28).repeat(2, 1, 1, 1)
    moved = RandomAffine()(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(moved[0], moved[1])


def test_random_affine_keeps_empty_batch():
    assert RandomAffine()(torch.zeros(0, 1, 28, 28)).shape == (0, 1, 28, 28)


def test_random_affine_does_not_mirror():
    # A bright left half must stay mostly on the left under small moves.
    images = torch.zeros(16, 1, 28, 28)
    images[..., :14] = 1.0
    moved = RandomAffine()(images, torch.Generator().manual_seed(1))
    left = moved[..., :14].mean(dim=(1, 2, 3))
    right = moved[..., 14:].mean(dim=(1, 2, 3))
    assert bool((left > right + 0.5).all())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_rotation_degrees": 200}, "max_rotation_degrees must be in"),
        ({"max_scale": 1.0}, "max_scale must be in \\[0, 1\\), got 1.0"),
        ({"max_translation": 0.6}, "max_translation must be in \\[0, 0.5\\], got 0.6"),
    ],
)
def test_random_affine_rejects_invalid_ranges(arguments, message):
    with pytest.raises(ConfigError, match=message):
        RandomAffine(**arguments)
