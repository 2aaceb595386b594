"""Fast DP-SGD gradients against Opacus and against per-sample ground truth."""

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from medfed.contract.models import build_model
from medfed.dp_random import KeyedRandom
from medfed.errors import ConfigError
from medfed.sites import fastdp
from medfed.sites.fastdp import check_supported, poisson_batches, private_gradient


def bce(logits, labels):
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def batch(size=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 1, 28, 28, generator=generator)
    labels = (torch.rand(size, generator=generator) > 0.5).float()
    return images, labels


def opacus_gradient(model, images, labels, *, max_grad_norm, noise_multiplier, seed):
    """Opacus' reference: hooks, then DPOptimizer's clip, noise and scaling."""
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=0.1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(labels),
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer.zero_grad()
    F.binary_cross_entropy_with_logits(wrapped(images), labels).backward()
    optimizer.pre_step()
    grads = [p.grad.clone() for p in model.parameters()]
    wrapped._close()
    return grads


def fast_gradient(model, images, labels, *, max_grad_norm, noise_multiplier, seed):
    private_gradient(
        model,
        bce,
        images,
        labels,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=len(labels),
        generator=torch.Generator().manual_seed(seed),
    )
    return [p.grad.clone() for p in model.parameters()]


def ground_truth_norms(model, loss_fn, inputs, targets):
    """Per-sample gradient norms from one backward pass per sample."""
    norms = []
    for index in range(len(inputs)):
        model.zero_grad()
        loss_fn(
            model(inputs[index : index + 1]), targets[index : index + 1]
        ).sum().backward()
        squared = sum(p.grad.pow(2).sum() for p in model.parameters())
        norms.append(squared.sqrt())
    return torch.stack(norms)


def ground_truth_clipped_sum(model, loss_fn, inputs, targets, max_grad_norm):
    total = [torch.zeros_like(p) for p in model.parameters()]
    for index in range(len(inputs)):
        model.zero_grad()
        loss_fn(
            model(inputs[index : index + 1]), targets[index : index + 1]
        ).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return total


@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 100.0])
def test_fastdp_matches_opacus_clipped_sum(max_grad_norm):
    torch.manual_seed(1)
    model = build_model("resnet_gn", widths=[8, 16])
    reference = copy.deepcopy(model)
    images, labels = batch()
    fast = fast_gradient(
        model, images, labels, max_grad_norm=max_grad_norm, noise_multiplier=0.0, seed=0
    )
    expected = opacus_gradient(
        reference,
        images,
        labels,
        max_grad_norm=max_grad_norm,
        noise_multiplier=0.0,
        seed=0,
    )
    for ours, theirs in zip(fast, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_fastdp_matches_opacus_noise_for_same_seed():
    torch.manual_seed(2)
    model = build_model("resnet_gn", widths=[8, 16])
    reference = copy.deepcopy(model)
    images, labels = batch(seed=3)
    fast = fast_gradient(
        model, images, labels, max_grad_norm=1.0, noise_multiplier=1.3, seed=7
    )
    expected = opacus_gradient(
        reference, images, labels, max_grad_norm=1.0, noise_multiplier=1.3, seed=7
    )
    for ours, theirs in zip(fast, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_fastdp_noise_differs_for_other_seed():
    torch.manual_seed(2)
    model = build_model("resnet_gn", widths=[8, 16])
    images, labels = batch()
    first = fast_gradient(
        model, images, labels, max_grad_norm=1.0, noise_multiplier=1.0, seed=1
    )
    second = fast_gradient(
        model, images, labels, max_grad_norm=1.0, noise_multiplier=1.0, seed=2
    )
    assert not torch.allclose(first[0], second[0])


class MixedLayers(nn.Module):
    """Strided, dilated and biased convolutions, a shared layer, plain GroupNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=(1, 2), bias=True)
        self.conv2 = nn.Conv2d(4, 4, (3, 2), dilation=2, padding=1, bias=True)
        self.norm = nn.GroupNorm(2, 4, affine=False)
        self.norm_affine = nn.GroupNorm(2, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, inputs):
        hidden = torch.relu(self.norm(self.conv1(inputs)))
        hidden = torch.relu(self.norm_affine(self.conv2(hidden)))
        pooled = hidden.mean(dim=(2, 3))
        pooled = torch.tanh(self.shared(torch.tanh(self.shared(pooled))))
        return self.head(pooled).squeeze(-1)


def test_fastdp_norms_match_per_sample_backward():
    torch.manual_seed(3)
    model = MixedLayers()
    inputs = torch.randn(6, 2, 11, 13)
    targets = (torch.rand(6) > 0.5).float()
    expected = ground_truth_norms(model, bce, inputs, targets)
    step = private_gradient(
        model,
        bce,
        inputs,
        targets,
        max_grad_norm=1.0,
        noise_multiplier=0.0,
        expected_batch_size=1,
    )
    torch.testing.assert_close(step.norms, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step.losses, bce(model(inputs), targets))


def test_fastdp_clipped_sum_matches_per_sample_backward():
    torch.manual_seed(4)
    model = MixedLayers()
    inputs = torch.randn(6, 2, 11, 13)
    targets = (torch.rand(6) > 0.5).float()
    expected = ground_truth_clipped_sum(model, bce, inputs, targets, max_grad_norm=0.1)
    private_gradient(
        model,
        bce,
        inputs,
        targets,
        max_grad_norm=0.1,
        noise_multiplier=0.0,
        expected_batch_size=1,
    )
    for parameter, total in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, total, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(fastdp._CONV_METHODS))
@pytest.mark.parametrize(
    ("in_channels", "out_channels", "kernel", "stride", "padding", "dilation"),
    [
        (1, 4, 3, 1, 1, 1),
        (3, 5, 3, 2, 1, 1),
        (4, 6, 1, 2, 0, 1),
        (2, 3, (3, 2), (1, 2), (2, 0), (2, 1)),
    ],
)
def test_conv_per_sample_methods_match_per_sample_backward(
    method, in_channels, out_channels, kernel, stride, padding, dilation
):
    layer = nn.Conv2d(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=False,
    )
    generator = torch.Generator().manual_seed(3)
    activation = torch.randn(5, in_channels, 11, 9, generator=generator)
    backprop = torch.randn(layer(activation).shape, generator=generator)

    per_sample = fastdp._CONV_METHODS[method](layer, activation, backprop)

    for index in range(len(activation)):
        layer.zero_grad()
        output = layer(activation[index : index + 1])
        (output * backprop[index : index + 1]).sum().backward()
        assert torch.allclose(per_sample[index], layer.weight.grad, atol=1e-5)


def test_fastdp_every_sample_norm_is_clipped():
    torch.manual_seed(5)
    model = build_model("resnet_gn", widths=[8, 16])
    images, labels = batch(size=1)
    step = private_gradient(
        model,
        bce,
        images,
        labels,
        max_grad_norm=1e-3,
        noise_multiplier=0.0,
        expected_batch_size=1,
    )
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert step.norms[0] > 1e-3
    assert float(total) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_fastdp_noise_std_is_sigma_c_over_batch(sigma):
    model = build_model("resnet_gn", widths=[8, 16])
    empty_images = torch.zeros(0, 1, 28, 28)
    empty_labels = torch.zeros(0)
    private_gradient(
        model,
        bce,
        empty_images,
        empty_labels,
        max_grad_norm=0.7,
        noise_multiplier=sigma,
        expected_batch_size=32,
        generator=torch.Generator().manual_seed(11),
    )
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = sigma * 0.7 / 32
    assert noise.numel() > 4000
    assert abs(float(noise.mean())) < 0.1 * expected
    assert float(noise.std()) == pytest.approx(expected, rel=0.15)


def noise_only_gradient(model: nn.Module, **sources: object) -> None:
    """Store in ``model``'s gradients the DP noise of an empty batch."""
    private_gradient(
        model,
        bce,
        torch.zeros(0, 1, 28, 28),
        torch.zeros(0),
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        expected_batch_size=10,
        **sources,  # type: ignore[arg-type]
    )


def test_fastdp_keyed_noise_keeps_noise_scale():
    model = build_model("resnet_gn", widths=[8, 16])
    noise_only_gradient(model, noise_source=KeyedRandom(bytes(32)))
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float(noise.std()) == pytest.approx(0.1, rel=0.15)


def test_fastdp_rejects_two_noise_sources():
    model = build_model("resnet_gn", widths=[8, 16])
    with pytest.raises(ValueError, match="a generator or a noise_source, not both"):
        noise_only_gradient(
            model,
            generator=torch.Generator().manual_seed(0),
            noise_source=KeyedRandom(bytes(32)),
        )


def test_fastdp_rejects_batchnorm():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1)
    )
    with pytest.raises(ConfigError, match="layer '1' of type BatchNorm2d") as caught:
        check_supported(model)
    assert "GradSampleModule" in str(caught.value)


def test_fastdp_rejects_grouped_convolution():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2") as caught:
        check_supported(model)
    assert "zero padding given as integers" in str(caught.value)


def test_fastdp_rejects_inplace_activation():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 26 * 26, 1),
        nn.Flatten(0),
    )
    images, labels = batch(size=3)
    with pytest.raises(ConfigError, match="GroupNorm was modified in place") as caught:
        private_gradient(
            model,
            bce,
            images,
            labels,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=3,
        )
    assert "inplace=False" in str(caught.value)


def test_fastdp_rejects_mean_loss():
    model = build_model("resnet_gn", widths=[8, 16])
    images, labels = batch(size=4)
    with pytest.raises(ConfigError, match=r"shape \(4,\), got \(\)") as caught:
        private_gradient(
            model,
            F.binary_cross_entropy_with_logits,
            images,
            labels,
            max_grad_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=4,
        )
    assert "reduction='none'" in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0, got 0.0"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0, got -1.0"),
        ({"expected_batch_size": 0}, "expected_batch_size must be > 0, got 0"),
    ],
)
def test_fastdp_rejects_invalid_privacy_settings(settings, message):
    model = build_model("resnet_gn", widths=[8, 16])
    images, labels = batch(size=2)
    arguments = {
        "max_grad_norm": 1.0,
        "noise_multiplier": 1.0,
        "expected_batch_size": 2,
    }
    arguments.update(settings)
    with pytest.raises(ConfigError, match=message):
        private_gradient(model, bce, images, labels, **arguments)


def test_poisson_batches_repeat_for_seed():
    first = list(
        poisson_batches(
            100, sample_rate=0.1, generator=torch.Generator().manual_seed(0)
        )
    )
    second = list(
        poisson_batches(
            100, sample_rate=0.1, generator=torch.Generator().manual_seed(0)
        )
    )
    assert len(first) == 10
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_poisson_batches_mean_size_is_rate_times_count():
    sizes = [
        len(indices)
        for indices in poisson_batches(
            1000,
            sample_rate=0.05,
            generator=torch.Generator().manual_seed(1),
            steps=200,
        )
    ]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)


@pytest.mark.parametrize(
    ("count", "rate", "message"),
    [
        (10, 0.0, "sample_rate must be in \\(0, 1\\], got 0.0"),
        (10, 1.5, "sample_rate must be in \\(0, 1\\], got 1.5"),
        (0, 0.5, "num_samples must be >= 1, got 0"),
    ],
)
def test_poisson_batches_reject_invalid_arguments(count, rate, message):
    with pytest.raises(ConfigError, match=message):
        next(poisson_batches(count, sample_rate=rate))


def test_keyed_noise_rejects_integer_tensor():
    with pytest.raises(ValueError, match=r"floating-point tensors, got torch\.int64"):
        fastdp.keyed_noise_like(
            torch.zeros(3, dtype=torch.long), 1.0, KeyedRandom(bytes(32))
        )
