"""The gradient correction hook of local training, with and without DP.

SCAFFOLD corrects each step's gradient. Under DP the correction must act on
the gradient after clipping and noise, so it receives (and may replace) exactly
what the optimizer would otherwise use. A correction that zeroes the gradient
therefore leaves the model where it started, on every training path.
"""

import pytest
import torch
from torch import nn

from medfed.sites.fastdp import supports_fast_dp
from medfed.sites.training import LocalTrainingSettings, train_locally


class LayerNormModel(nn.Module):
    """A model with LayerNorm, which the one-pass DP step does not support."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(inputs)).squeeze(-1)


class LinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs).squeeze(-1)


def settings(private: bool) -> LocalTrainingSettings:
    return LocalTrainingSettings(
        epochs=2,
        batch_size=8,
        learning_rate=0.5,
        max_grad_norm=1.0 if private else None,
        noise_multiplier=1.0 if private else None,
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 4, generator=generator)
    labels = (inputs[:, 0] > 0).float()
    return inputs, labels


@pytest.mark.parametrize(
    ("model_class", "private", "fast"),
    [
        (LinearModel, False, False),
        (LinearModel, True, True),
        (LayerNormModel, True, False),
    ],
    ids=["plain", "fast-dp", "opacus-dp"],
)
def test_correction_acts_on_final_gradient(
    model_class: type[nn.Module], private: bool, fast: bool
) -> None:
    inputs, labels = data()
    torch.manual_seed(1)
    model = model_class()
    assert (private and supports_fast_dp(model)) == fast
    start = [parameter.detach().clone() for parameter in model.parameters()]
    calls = []

    def zero_gradients(corrected: nn.Module) -> None:
        calls.append(corrected)
        for parameter in corrected.parameters():
            assert parameter.grad is not None
            parameter.grad.zero_()

    result = train_locally(
        model,
        inputs,
        labels,
        settings(private),
        seed=3,
        correct_gradients=zero_gradients,
    )

    assert len(calls) == result.steps
    assert all(corrected is model for corrected in calls)
    for before, after in zip(start, model.parameters(), strict=True):
        torch.testing.assert_close(after.detach(), before)


@pytest.mark.parametrize("model_class", [LinearModel, LayerNormModel])
def test_training_moves_without_correction(model_class: type[nn.Module]) -> None:
    inputs, labels = data()
    torch.manual_seed(1)
    model = model_class()
    start = [parameter.detach().clone() for parameter in model.parameters()]

    train_locally(model, inputs, labels, settings(True), seed=3)

    moved = [
        not torch.equal(before, after.detach())
        for before, after in zip(start, model.parameters(), strict=True)
    ]
    assert all(moved)
