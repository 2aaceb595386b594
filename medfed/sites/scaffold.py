"""SCAFFOLD at the site: the control variate ``c_i`` and the corrected steps.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020). Each local step uses the corrected gradient
``g - c_i + c``, where ``c`` is the server control variate published next to
the global model and ``c_i`` the site's own. After ``K`` local steps of
learning rate ``lr`` from global weights ``x`` to local weights ``y``, the
site updates its variate with the paper's option II::

    c_i_new = c_i - c + (x - y) / (K * lr)

and sends ``c_i_new - c_i`` in ``SiteUpdate.extras["control_delta"]``.

How the site trainer uses it::

    scaffold = ScaffoldSite.load(state_path, global_weights, server_control)
    for batch in batches:                       # K steps of plain SGD
        loss.backward()
        scaffold.correct_gradients(model)       # without DP: before the step
        optimizer.step()
        # under Opacus, instead: optimizer.step() then
        # scaffold.apply_correction_step(model, learning_rate=lr)
    new_control, control_delta = scaffold.control_update(
        local_weights, local_steps=K, learning_rate=lr)
    ... upload the delta and control_delta ...
    scaffold.commit(new_control)                # only once the upload is accepted

Opacus replaces ``p.grad`` by its noised per-sample sum inside
``optimizer.step()``, so a correction added to ``p.grad`` before the step
would be lost. The separate step ``p -= lr * (c - c_i)`` is the same update
for SGD without momentum. It costs no privacy, because ``c`` and ``c_i`` are
computed from models that were already released.
"""

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfed.aggregation.params import require_float, require_int
from medfed.aggregation.strategies.base import Weights
from medfed.errors import ConfigError
from medfed.sites.tensor_files import load_tensors, save_tensors_atomic

__all__ = ["ScaffoldSite"]

logger = logging.getLogger(__name__)


def _zeros_like(weights: Mapping[str, np.ndarray]) -> Weights:
    return {
        key: np.zeros(np.shape(value), np.float64) for key, value in weights.items()
    }


def _check_like(
    description: str,
    tensors: Mapping[str, np.ndarray],
    weights: Mapping[str, np.ndarray],
) -> Weights:
    if set(tensors) != set(weights):
        raise ConfigError(
            f"{description} has tensors {sorted(tensors)}, but the global model has "
            f"{sorted(weights)}"
        )
    for key, value in weights.items():
        if np.shape(tensors[key]) != np.shape(value):
            shape = list(np.shape(tensors[key]))
            raise ConfigError(
                f"{description} tensor {key!r} has shape {shape}, "
                f"but the global model's has {list(np.shape(value))}"
            )
    return {key: np.asarray(value, np.float64) for key, value in tensors.items()}


class ScaffoldSite:
    """A site's SCAFFOLD state for one round.

    Build it with ``ScaffoldSite.load``. Arrays are float64 numpy; the
    corrections applied to the model are cast to each parameter's dtype.
    """

    def __init__(
        self,
        state_path: Path,
        global_weights: Mapping[str, np.ndarray],
        site_control: Mapping[str, np.ndarray],
        server_control: Mapping[str, np.ndarray],
    ) -> None:
        self.state_path = state_path
        self.global_weights = {
            key: np.asarray(value, np.float64) for key, value in global_weights.items()
        }
        self.site_control = _check_like(
            "site control variate", site_control, global_weights
        )
        self.server_control = _check_like(
            "server control variate", server_control, global_weights
        )
        #: ``c - c_i``, added to every local gradient.
        self.correction = {
            key: self.server_control[key] - self.site_control[key]
            for key in self.global_weights
        }

    @classmethod
    def load(
        cls,
        state_path: Path,
        global_weights: Mapping[str, np.ndarray],
        server_control: Mapping[str, np.ndarray] | None,
    ) -> "ScaffoldSite":
        """Read ``c_i`` from ``state_path``, zeros when the site has none yet.

        Args:
            state_path: the site's safetensors file for ``c_i``.
            global_weights: the round's global model.
            server_control: ``c`` as published; None or empty before the
                first aggregation, meaning zeros.

        Raises:
            ConfigError: a variate does not match the model's tensors.
            DataError: the state file exists but cannot be read.
        """
        if state_path.exists():
            site_control: Weights = load_tensors(state_path)
        else:
            logger.info("no SCAFFOLD state at %s; starting from zeros", state_path)
            site_control = _zeros_like(global_weights)
        server = dict(server_control) if server_control else _zeros_like(global_weights)
        return cls(state_path, global_weights, site_control, server)

    def _corrections_for(
        self, model: nn.Module
    ) -> list[tuple[nn.Parameter, np.ndarray]]:
        pairs = []
        for name, parameter in model.named_parameters():
            key = name.removeprefix("_module.")
            if key not in self.correction:
                raise ConfigError(
                    f"model parameter {key!r} is not in the global model; "
                    "SCAFFOLD needs the same parameter names on both sides"
                )
            pairs.append((parameter, self.correction[key]))
        return pairs

    @torch.no_grad()
    def correct_gradients(self, model: nn.Module) -> None:
        """Add ``c - c_i`` to every parameter's ``grad`` (non-DP training)."""
        for parameter, correction in self._corrections_for(model):
            tensor = torch.as_tensor(correction, dtype=parameter.dtype)
            if parameter.grad is None:
                parameter.grad = tensor.clone()
            else:
                parameter.grad.add_(tensor)

    @torch.no_grad()
    def apply_correction_step(self, model: nn.Module, *, learning_rate: float) -> None:
        """Move every parameter by ``-learning_rate * (c - c_i)`` (DP training)."""
        learning_rate = require_float(
            "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True
        )
        for parameter, correction in self._corrections_for(model):
            tensor = torch.as_tensor(correction, dtype=parameter.dtype)
            parameter.sub_(learning_rate * tensor)

    def control_update(
        self,
        local_weights: Mapping[str, np.ndarray],
        *,
        local_steps: int,
        learning_rate: float,
    ) -> tuple[Weights, Weights]:
        """Return ``c_i_new`` (option II) and ``control_delta = c_i_new - c_i``.

        Args:
            local_weights: the site's weights after local training (y_i).
            local_steps: number of optimizer steps taken this round (K), >= 1.
            learning_rate: the local learning rate, > 0.
        """
        local_steps = require_int("local_steps", local_steps, minimum=1)
        learning_rate = require_float(
            "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True
        )
        local = _check_like("local weights", local_weights, self.global_weights)
        scale = 1.0 / (local_steps * learning_rate)
        new_control = {
            key: self.site_control[key]
            - self.server_control[key]
            + scale * (self.global_weights[key] - local[key])
            for key in self.global_weights
        }
        control_delta = {
            key: (new_control[key] - self.site_control[key]).astype(np.float32)
            for key in new_control
        }
        return new_control, control_delta

    def commit(self, new_control: Mapping[str, np.ndarray]) -> None:
        """Persist ``c_i_new`` atomically; call once the upload was accepted."""
        checked = _check_like(
            "new site control variate", new_control, self.global_weights
        )
        save_tensors_atomic(self.state_path, checked)
        self.site_control = checked
