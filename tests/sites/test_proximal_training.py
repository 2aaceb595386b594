"""FedProx in the site's local training, with and without Opacus."""

import torch

from medfed.contract.models import build_model
from medfed.sites.training import LocalTrainingSettings, train_locally


def distance_moved(settings: LocalTrainingSettings) -> float:
    torch.manual_seed(0)
    inputs = torch.randn(64, 3)
    labels = (inputs[:, 0] > 0).float()
    model = build_model("logistic_regression", in_features=3)
    start = [parameter.detach().clone() for parameter in model.parameters()]
    train_locally(model, inputs, labels, settings, seed=1)
    return float(
        sum(
            torch.sum((parameter.detach() - begin) ** 2)
            for parameter, begin in zip(model.parameters(), start, strict=True)
        )
        ** 0.5
    )


def test_proximal_term_keeps_weights_near_start() -> None:
    plain = LocalTrainingSettings(epochs=5, batch_size=8, learning_rate=0.5)
    proximal = LocalTrainingSettings(
        epochs=5, batch_size=8, learning_rate=0.5, proximal_mu=5.0
    )
    assert distance_moved(proximal) < 0.5 * distance_moved(plain)


def test_proximal_term_applies_under_dp() -> None:
    private = {"max_grad_norm": 1.0, "noise_multiplier": 0.1}
    plain = LocalTrainingSettings(epochs=5, batch_size=8, learning_rate=0.5, **private)
    proximal = LocalTrainingSettings(
        epochs=5, batch_size=8, learning_rate=0.5, proximal_mu=5.0, **private
    )
    assert distance_moved(proximal) < 0.5 * distance_moved(plain)
