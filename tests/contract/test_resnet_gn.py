"""The GroupNorm ResNet: shapes, Opacus compatibility, registry."""

import pytest
import torch
from opacus.validators import ModuleValidator

from medfed.contract.models import build_model
from medfed.errors import ConfigError


def test_resnet_gn_returns_one_logit_per_image():
    model = build_model("resnet_gn")
    logits = model(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5,)


def test_resnet_gn_passes_strict_opacus_validation():
    model = build_model("resnet_gn")
    ModuleValidator.validate(model, strict=True)


def test_resnet_gn_has_no_batchnorm():
    model = build_model("resnet_gn")
    kinds = {type(module).__name__ for module in model.modules()}
    assert not any("BatchNorm" in kind for kind in kinds)
    assert "GroupNorm" in kinds


def test_resnet_gn_widths_change_size():
    small = build_model("resnet_gn", widths=[8, 16, 32])
    default = build_model("resnet_gn")
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(small) < count(default)
    assert small(torch.rand(2, 1, 28, 28)).shape == (2,)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"widths": []}, "widths must be a non-empty list of channel counts"),
        (
            {"widths": "16"},
            "widths must be a non-empty list of channel counts, got '16'",
        ),
        (
            {"widths": [16, 32.5]},
            "each entry of widths must be a positive integer, got 32.5",
        ),
        ({"widths": [16, 0]}, "each entry of widths must be a positive integer, got 0"),
        ({"widths": [12, 24]}, "divisible by groups=8"),
        ({"groups": 0}, "groups must be a positive integer, got 0"),
        ({"groups": 8.0}, "groups must be a positive integer, got 8.0"),
        ({"groups": True}, "groups must be a positive integer, got True"),
        ({"in_channels": True}, "in_channels must be a positive integer, got True"),
        ({"in_channels": "1"}, "in_channels must be a positive integer, got '1'"),
        ({"depth": 3}, "unexpected keyword argument 'depth'"),
    ],
)
def test_resnet_gn_rejects_invalid_params(params, message):
    with pytest.raises(
        ConfigError, match="invalid parameters for model 'resnet_gn'"
    ) as caught:
        build_model("resnet_gn", **params)
    assert message in str(caught.value)
