"""Site-side terms of FedProx: the proximal penalty and its DP-safe step.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020) adds ``mu / 2 * ||w - w_global||^2`` to each site's local loss.

How the site trainer uses it:

- Without DP, add the penalty to the batch loss before ``backward()``::

      loss = criterion(model(x), y) + proximal_penalty(model, global_weights, mu=mu)

- Under Opacus, do not add it to the loss: Opacus builds the step from
  per-sample gradients (``p.grad_sample``) and overwrites ``p.grad``, so the
  penalty's gradient would be silently dropped. Instead call
  ``apply_proximal_step`` after every ``optimizer.step()``. The penalty does
  not touch patient data, so the extra step costs no privacy.

``mu`` comes from the strategy's ``site_settings()["proximal_mu"]``.
"""

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from medfed.aggregation.params import require_float
from medfed.errors import ConfigError

__all__ = ["apply_proximal_step", "proximal_penalty"]


def _global_tensor(
    name: str, parameter: torch.Tensor, global_weights: Mapping[str, np.ndarray]
) -> torch.Tensor:
    if name not in global_weights:
        raise ConfigError(
            f"global weights lack parameter {name!r}; the site model and the "
            "global model must have the same parameter names"
        )
    reference = torch.as_tensor(np.asarray(global_weights[name]), dtype=parameter.dtype)
    if reference.shape != parameter.shape:
        raise ConfigError(
            f"global parameter {name!r} has shape {list(reference.shape)}, "
            f"but the site model's has {list(parameter.shape)}"
        )
    return reference.to(parameter.device)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # Opacus' GradSampleModule prefixes parameter names with "_module.".
    return [
        (name.removeprefix("_module."), parameter)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    ]


def proximal_penalty(
    model: nn.Module, global_weights: Mapping[str, np.ndarray], *, mu: float
) -> torch.Tensor:
    """Return ``mu / 2 * sum ||w - w_global||^2`` over the trainable parameters.

    Every trainable parameter must be in ``global_weights``. With
    personalized layers, pass the merged weights (see
    ``personalization.merge_global``), so local layers are pulled toward
    their values at the start of the round.

    Args:
        model: the site's model (plain or wrapped by Opacus).
        global_weights: the global model this round started from.
        mu: proximal strength, >= 0.

    Returns:
        A scalar tensor connected to the model's graph.
    """
    mu = require_float("mu", mu, minimum=0.0)
    penalty = torch.zeros(())
    for name, parameter in _trainable(model):
        reference = _global_tensor(name, parameter, global_weights)
        penalty = penalty + torch.sum((parameter - reference) ** 2)
    return 0.5 * mu * penalty


@torch.no_grad()
def apply_proximal_step(
    model: nn.Module,
    global_weights: Mapping[str, np.ndarray],
    *,
    mu: float,
    learning_rate: float,
) -> None:
    """Apply the proximal operator of the FedProx term to the parameters.

    Sets ``w = (w + learning_rate * mu * w_global) / (1 + learning_rate * mu)``,
    the exact minimizer of ``mu / 2 * ||w' - w_global||^2 + ||w' - w||^2 /
    (2 * learning_rate)``, which is stable for any step size.

    Args:
        model: the site's model (plain or wrapped by Opacus).
        global_weights: the global model this round started from.
        mu: proximal strength, >= 0.
        learning_rate: the local optimizer's learning rate, > 0.
    """
    mu = require_float("mu", mu, minimum=0.0)
    learning_rate = require_float(
        "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True
    )
    shrink = learning_rate * mu
    for name, parameter in _trainable(model):
        reference = _global_tensor(name, parameter, global_weights)
        parameter.add_(reference, alpha=shrink).div_(1 + shrink)
