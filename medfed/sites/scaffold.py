"""SCAFFOLD at the site: the control variate ``c_i`` and the corrected steps.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning" (ICML 2020). Each local step uses the corrected gradient
``g - c_i + c``, where ``c`` is the server control variate published next to
the global model and ``c_i`` the site's own. After ``K`` local steps of
learning rate ``lr`` from global weights ``x`` to local weights ``y``, the
site updates its variate with the paper's option II::

    c_i_new = c_i - c + (x - y) / (K * lr)

and sends ``c_i_new - c_i`` as the ``control_delta`` extras group of its
upload. With SGD momentum ``beta``, ``K`` becomes the number of gradient
lengths the steps moved: ``sum over k = 1..K of (1 - beta^k) / (1 - beta)``,
exact when the gradient is constant, so ``c_i`` stays in gradient units.

How the site trainer uses it (``medfed.sites.runner``)::

    scaffold = ScaffoldSite.load(state_path, global_weights, server_control)
    for batch in batches:                       # K optimizer steps
        loss.backward()                         # or DP: clip, sum, add noise
        scaffold.correct_gradients(model)       # add c - c_i to p.grad
        optimizer.step()
    new_control, control_delta = scaffold.control_update(
        local_weights, local_steps=K, learning_rate=lr, momentum=beta)
    ... upload the delta and control_delta ...
    scaffold.commit(new_control)                # only once the upload is accepted

Under DP the correction is added to ``p.grad`` after clipping and noise
(after ``private_gradient``, or inside Opacus' ``DPOptimizer`` between
``pre_step`` and the SGD step). It costs no privacy, because ``c`` and
``c_i`` are computed from models that were already released or trained
under DP in earlier rounds. ``apply_correction_step`` is the same update as
a separate step after ``optimizer.step()``, exact for SGD without momentum.
"""

import logging
from collections.abc import Collection, Mapping
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


def _gradient_lengths(steps: int, momentum: float) -> float:
    """Return how many gradients ``steps`` SGD steps with momentum move by.

    With a constant gradient the k-th step (buffer starting at zero) moves
    ``(1 - momentum^k) / (1 - momentum)`` times the gradient; without
    momentum this is ``steps``.
    """
    if momentum == 0.0:
        return float(steps)
    powers = momentum ** np.arange(1, steps + 1, dtype=np.float64)
    return float(np.sum((1.0 - powers) / (1.0 - momentum)))


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
        *,
        uncorrected: Collection[str] = (),
    ) -> None:
        self.state_path = state_path
        #: Model parameters trained without correction: the study's local
        #: layers, which have no control variate.
        self.uncorrected = frozenset(uncorrected)
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
        *,
        uncorrected: Collection[str] = (),
    ) -> "ScaffoldSite":
        """Read ``c_i`` from ``state_path``, zeros when the site has none yet.

        Args:
            state_path: the site's safetensors file for ``c_i``.
            global_weights: the round's global model, without the layers in
                ``uncorrected``.
            server_control: ``c`` as published; None or empty before the
                first aggregation, meaning zeros.
            uncorrected: model parameters that are trained without
                correction (layers the study keeps local).

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
        return cls(
            state_path, global_weights, site_control, server, uncorrected=uncorrected
        )

    def _corrections_for(
        self, model: nn.Module
    ) -> list[tuple[nn.Parameter, np.ndarray]]:
        pairs = []
        for name, parameter in model.named_parameters():
            key = name.removeprefix("_module.")
            if key in self.uncorrected:
                continue
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
        momentum: float = 0.0,
    ) -> tuple[Weights, Weights]:
        """Return ``c_i_new`` (option II) and ``control_delta = c_i_new - c_i``.

        Args:
            local_weights: the site's weights after local training (y_i),
                with the same tensors as the global weights.
            local_steps: number of optimizer steps taken this round (K), >= 1.
            learning_rate: the local learning rate, > 0.
            momentum: the local SGD momentum in [0, 1), with a buffer that
                starts at zero each round.
        """
        local_steps = require_int("local_steps", local_steps, minimum=1)
        learning_rate = require_float(
            "learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True
        )
        momentum = require_float(
            "momentum", momentum, minimum=0.0, maximum=1.0, exclusive_maximum=True
        )
        local = _check_like("local weights", local_weights, self.global_weights)
        scale = 1.0 / (_gradient_lengths(local_steps, momentum) * learning_rate)
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
