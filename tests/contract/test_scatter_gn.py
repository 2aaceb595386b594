"""The scattering front end and the ScatterNet classifier built on it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from medfed.contract.models import build_model
from medfed.contract.models.scatter import Scattering2D, scattering_channels
from medfed.errors import ConfigError
from medfed.sites.fastdp import check_supported, private_gradient

# Coefficients of kymatio 0.3.0's Scattering2D(J=2, shape=(28, 28), L=8) on
# ``smooth_image()``, as (channel, value at row 3 col 3, value at row 0 col 6).
# kymatio itself cannot be imported with scipy 1.17, so the values are fixed.
KYMATIO_REFERENCE = [
    (0, 0.8885148763656616, 0.07471707463264465),
    (1, 0.0348576083779335, 0.019485730677843094),
    (9, 0.06030721589922905, 0.04293486848473549),
    (16, 0.02722148597240448, 0.06473778188228607),
    (17, 0.0016026010271161795, 0.0018527365755289793),
    (40, 0.002765610348433256, 0.002923364983871579),
    (80, 0.0019173009786754847, 0.0014949332689866424),
]


def smooth_image():
    rows = torch.arange(28.0).view(28, 1)
    cols = torch.arange(28.0).view(1, 28)
    image = torch.sin(rows / 3.0) * torch.cos(cols / 5.0) + rows / 28.0
    return image.view(1, 1, 28, 28)


def test_scattering_channel_count():
    assert scattering_channels(2, 8) == 81
    assert scattering_channels(3, 8) == 217
    assert scattering_channels(1, 6) == 7


def test_scattering_output_shape():
    scattering = Scattering2D((28, 28))
    coefficients = scattering(torch.rand(3, 2, 28, 28))
    assert coefficients.shape == (3, 2 * 81, 7, 7)


@pytest.mark.parametrize(("channel", "center", "edge"), KYMATIO_REFERENCE)
def test_scattering_matches_kymatio(channel, center, edge):
    coefficients = Scattering2D((28, 28))(smooth_image())[0]
    assert coefficients[channel, 3, 3].item() == pytest.approx(center, abs=1e-6)
    assert coefficients[channel, 0, 6].item() == pytest.approx(edge, abs=1e-6)


def test_scattering_of_constant_image_is_its_mean():
    coefficients = Scattering2D((28, 28))(torch.full((1, 1, 28, 28), 0.7))[0]
    torch.testing.assert_close(
        coefficients[0], torch.full((7, 7), 0.7), atol=1e-4, rtol=0
    )
    # Morlet wavelets have zero mean, so a constant image has no energy above
    # the low-pass band.
    assert coefficients[1:].abs().max().item() < 1e-6


def test_scattering_chunks_match_one_pass():
    images = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    scattering = Scattering2D((28, 28))
    whole = scattering(images)
    torch.testing.assert_close(whole[256:], scattering(images[256:]))
    torch.testing.assert_close(whole[:5], scattering(images[:5]))


def test_scattering_of_empty_batch_is_empty():
    coefficients = Scattering2D((28, 28))(torch.zeros(0, 1, 28, 28))
    assert coefficients.shape == (0, 81, 7, 7)


def test_scattering_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"expected images of shape"):
        Scattering2D((28, 28))(torch.rand(2, 1, 32, 32))


def test_scatter_gn_returns_one_logit_per_image():
    model = build_model("scatter_gn")
    logits = model(torch.rand(5, 1, 28, 28))
    assert logits.shape == (5,)


def test_scatter_gn_passes_strict_opacus_validation():
    model = build_model("scatter_gn")
    ModuleValidator.validate(model, strict=True)


def test_scatter_gn_trains_only_the_linear_head():
    model = build_model("scatter_gn")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert model.head.weight.shape == (1, 81 * 7 * 7)


def test_scatter_gn_state_dict_excludes_filters():
    # The state dict is what sites upload, and the fixed filters need not go.
    model = build_model("scatter_gn")
    assert set(model.state_dict()) == {"head.weight", "head.bias"}


def test_scatter_gn_takes_fast_dp_path():
    model = build_model("scatter_gn")
    assert check_supported(model) == [model.head]


def test_scatter_gn_fast_dp_matches_opacus():
    torch.manual_seed(3)
    model = build_model("scatter_gn")
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(10, 1, 28, 28, generator=generator)
    labels = (torch.rand(10, generator=generator) > 0.5).float()

    private_gradient(
        model,
        lambda logits, y: F.binary_cross_entropy_with_logits(
            logits, y, reduction="none"
        ),
        images,
        labels,
        max_grad_norm=0.5,
        noise_multiplier=1.1,
        expected_batch_size=10,
        generator=torch.Generator().manual_seed(5),
    )

    wrapped = GradSampleModule(reference)
    optimizer = DPOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=0.1),
        noise_multiplier=1.1,
        max_grad_norm=0.5,
        expected_batch_size=10,
        generator=torch.Generator().manual_seed(5),
    )
    optimizer.zero_grad()
    F.binary_cross_entropy_with_logits(wrapped(images), labels).backward()
    optimizer.pre_step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    wrapped._close()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"groups": 4}, "positive divisor of the 81 scattering channels, got 4"),
        ({"groups": 0}, "groups must be a positive integer, got 0"),
        ({"groups": -9}, "groups must be a positive integer, got -9"),
        ({"groups": 9.0}, "groups must be a positive integer, got 9.0"),
        ({"groups": True}, "groups must be a positive integer, got True"),
        ({"groups": "9"}, "groups must be a positive integer, got '9'"),
        ({"groups": None}, "groups must be a positive integer, got None"),
        ({"image_size": 30}, "must be a multiple of 2**scales = 4"),
        ({"image_size": 0}, "image_size must be a positive integer, got 0"),
        ({"image_size": 28.0}, "image_size must be a positive integer, got 28.0"),
        ({"image_size": "28"}, "image_size must be a positive integer, got '28'"),
        ({"image_size": True}, "image_size must be a positive integer, got True"),
        ({"image_size": 4}, "too small for scales=2"),
        ({"scales": 0}, "scales must be a positive integer, got 0"),
        ({"scales": 1.5}, "scales must be a positive integer, got 1.5"),
        ({"scales": True}, "scales must be a positive integer, got True"),
        ({"scales": 5}, "image shape (28, 28) is smaller than 2**scales = 2**5"),
        ({"scales": 10**6}, "smaller than 2**scales = 2**1000000 pixels per side"),
        ({"orientations": 0}, "orientations must be a positive integer, got 0"),
        ({"orientations": 8.5}, "orientations must be a positive integer, got 8.5"),
        ({"orientations": "8"}, "orientations must be a positive integer, got '8'"),
        (
            {"orientations": True, "groups": 1},
            "orientations must be a positive integer, got True",
        ),
        ({"in_channels": 0}, "in_channels must be a positive integer, got 0"),
        ({"in_channels": 1.5}, "in_channels must be a positive integer, got 1.5"),
        ({"widths": [8]}, "unexpected keyword argument 'widths'"),
    ],
)
def test_scatter_gn_rejects_invalid_params(params, message):
    with pytest.raises(
        ConfigError, match="invalid parameters for model 'scatter_gn'"
    ) as caught:
        build_model("scatter_gn", **params)
    assert message in str(caught.value)
