"""Local training at a site, with or without record-level DP (Opacus DP-SGD).

Under DP the site samples each batch by Poisson sampling with rate
``batch_size / records`` (``DPDataLoader``), clips each record's gradient to
``max_grad_norm`` and adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to the summed gradient (``DPOptimizer``).
An epoch is ``int(records / batch_size)`` such steps, which is what the
privacy ledger counts. Under DP, batch sampling and noise come from
``KeyedRandom`` (ChaCha20) under a secret key per site and round, never from
torch's generator, whose 64-bit seed could be guessed. The same key replays a
round bit for bit. Without DP, randomness comes from torch generators seeded
per site and round.

Models whose trainable layers ``medfed.sites.fastdp`` supports (convolutions,
linear layers, GroupNorm) take the one-backward-pass DP-SGD step, which
computes the same clipped, noised gradient as Opacus' hooks with the same
batches and noise draws. Other models use Opacus' ``GradSampleModule``.
"""

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.dp_random import KEY_BYTES, KeyedRandom, derive_key
from medfed.errors import ConfigError
from medfed.sites.data.augment import RandomAffine
from medfed.sites.fastdp import (
    keyed_noise_like,
    poisson_batches,
    private_gradient,
    supports_fast_dp,
)
from medfed.sites.regularizers import apply_proximal_step

__all__ = [
    "GradientCorrection",
    "LocalTrainingSettings",
    "TrainingResult",
    "dp_steps_per_epoch",
    "train_locally",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTrainingSettings:
    """Hyperparameters of one site's local training in one round."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: Per-record clipping norm; None trains without DP.
    max_grad_norm: float | None = None
    noise_multiplier: float | None = None
    #: Random affine moves of image batches (B, C, H, W); None trains on the
    #: stored images as they are.
    augmentation: RandomAffine | None = None
    #: Weight of the positive class in the loss, as ``pos_weight`` of
    #: ``BCEWithLogitsLoss``; None weighs both classes alike.
    positive_weight: float | None = None
    #: Added to every logit in the loss, never at evaluation: the site's
    #: ``tau * log(positives / negatives)`` under logit adjustment.
    logit_offset: float = 0.0
    #: FedProx strength; each step is followed by the proximal step toward the
    #: round's starting weights (see ``medfed.sites.regularizers``).
    proximal_mu: float | None = None

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None


@dataclass(frozen=True)
class TrainingResult:
    steps: int
    mean_loss: float


def dp_sample_rate(records: int, batch_size: int) -> float:
    """Return the Poisson sampling rate for an expected batch of ``batch_size``."""
    if records <= 0:
        raise ConfigError(f"a site needs at least one training record, got {records}")
    return min(1.0, batch_size / records)


def dp_steps_per_epoch(records: int, batch_size: int) -> int:
    """Return the DP-SGD steps in one epoch, as ``DPDataLoader`` takes them."""
    return int(1 / dp_sample_rate(records, batch_size))


GradientCorrection = Callable[[nn.Module], None]
"""Changes ``p.grad`` of the model's parameters in place before each SGD step."""


def train_locally(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    settings: LocalTrainingSettings,
    *,
    seed: int,
    dp_key: bytes | None = None,
    correct_gradients: GradientCorrection | None = None,
) -> TrainingResult:
    """Train ``model`` in place on a site's training split.

    Args:
        model: a model returning one logit per record.
        inputs: features or images, first dimension = records.
        labels: float labels in {0, 1}, shape (records,).
        seed: seeds augmentation and, without DP, batch sampling.
        dp_key: under DP, the 32-byte secret that keys batch sampling and
            noise; use one key per site and round. None draws a key from the
            operating system, so the round cannot be replayed.
        correct_gradients: called with ``model`` once each step's gradient is
            final and before the optimizer uses it (SCAFFOLD's correction).
            Under DP that is after clipping, noise and scaling, so the
            correction must not depend on this round's records: then it is
            post-processing and the privacy guarantee is unchanged.
    """
    randomness = _DPRandomness.from_key(dp_key) if settings.private else None
    if randomness is not None and supports_fast_dp(model):
        return _train_fast_dp(
            model,
            inputs,
            labels,
            settings,
            randomness,
            seed=seed,
            correct_gradients=correct_gradients,
        )
    dataset = TensorDataset(inputs, labels)
    sampling = torch.Generator().manual_seed(seed)
    augmenting = torch.Generator().manual_seed(seed + 2)
    start = {
        name: parameter.detach().numpy().copy()
        for name, parameter in model.named_parameters()
    }
    loss_function = nn.BCEWithLogitsLoss(pos_weight=_positive_weight(settings))
    trained: nn.Module = model

    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    if randomness is not None:
        assert (
            settings.max_grad_norm is not None and settings.noise_multiplier is not None
        )
        trained = GradSampleModule(model)
        optimizer: torch.optim.Optimizer = _KeyedDPOptimizer(
            _sgd(trained, settings),
            noise_source=randomness.noise,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=settings.batch_size,
        )

        def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            for indices in randomness.batches(len(labels), settings.batch_size):
                yield inputs[indices], labels[indices]

    else:
        loader = DataLoader(
            dataset, batch_size=settings.batch_size, shuffle=True, generator=sampling
        )
        optimizer = _sgd(trained, settings)

        def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
            return loader

    trained.train()
    steps = 0
    loss_total = 0.0
    for _ in range(settings.epochs):
        for batch_inputs, batch_labels in batches():
            optimizer.zero_grad(set_to_none=True)
            if len(batch_labels) == 0:
                # Poisson sampling can draw an empty batch. The step still
                # happens (and is counted) with a zero gradient plus noise.
                loss = (trained(inputs[:1]) * 0).sum()
            else:
                if settings.augmentation is not None:
                    batch_inputs = settings.augmentation(batch_inputs, augmenting)
                loss = loss_function(
                    trained(batch_inputs) + settings.logit_offset, batch_labels
                )
            loss.backward()
            _optimizer_step(optimizer, model, correct_gradients)
            if settings.proximal_mu:
                apply_proximal_step(
                    model,
                    start,
                    mu=settings.proximal_mu,
                    learning_rate=settings.learning_rate,
                )
            steps += 1
            loss_total += float(loss.detach())
    if isinstance(trained, GradSampleModule):
        trained._close()
    return TrainingResult(steps=steps, mean_loss=loss_total / max(steps, 1))


def _train_fast_dp(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    settings: LocalTrainingSettings,
    randomness: "_DPRandomness",
    *,
    seed: int,
    correct_gradients: GradientCorrection | None = None,
) -> TrainingResult:
    """Train with ``private_gradient``: Poisson batches, clip, noise, SGD step.

    ``randomness`` is drawn from in the same order as in the Opacus path, so
    both paths draw the same batches and noise from the same key.
    """
    assert settings.max_grad_norm is not None and settings.noise_multiplier is not None
    augmenting = torch.Generator().manual_seed(seed + 2)
    start = {
        name: parameter.detach().numpy().copy()
        for name, parameter in model.named_parameters()
    }
    optimizer = _sgd(model, settings)
    positive_weight = _positive_weight(settings)

    def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            logits + settings.logit_offset,
            labels,
            reduction="none",
            pos_weight=positive_weight,
        )

    model.train()
    steps = 0
    loss_total = 0.0
    for _ in range(settings.epochs):
        for indices in randomness.batches(len(labels), settings.batch_size):
            batch_inputs, batch_labels = inputs[indices], labels[indices]
            if settings.augmentation is not None:
                batch_inputs = settings.augmentation(batch_inputs, augmenting)
            optimizer.zero_grad(set_to_none=True)
            step = private_gradient(
                model,
                per_sample_loss,
                batch_inputs,
                batch_labels,
                max_grad_norm=settings.max_grad_norm,
                noise_multiplier=settings.noise_multiplier,
                expected_batch_size=settings.batch_size,
                noise_source=randomness.noise,
            )
            if correct_gradients is not None:
                correct_gradients(model)
            optimizer.step()
            if settings.proximal_mu:
                apply_proximal_step(
                    model,
                    start,
                    mu=settings.proximal_mu,
                    learning_rate=settings.learning_rate,
                )
            steps += 1
            if len(step.losses):
                loss_total += float(step.losses.mean())
    return TrainingResult(steps=steps, mean_loss=loss_total / max(steps, 1))


@dataclass(frozen=True)
class _DPRandomness:
    """The two keyed streams of DP training: batch sampling and noise."""

    sampling: KeyedRandom
    noise: KeyedRandom

    @classmethod
    def from_key(cls, key: bytes | None) -> "_DPRandomness":
        """Return the streams derived from ``key``, or fresh ones when None.

        Raises:
            ValueError: ``key`` is not 32 bytes.
        """
        if key is None:
            return cls(KeyedRandom.from_entropy(), KeyedRandom.from_entropy())
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            actual = f"{len(key)} bytes" if isinstance(key, bytes) else repr(type(key))
            raise ValueError(
                f"dp_key must be {KEY_BYTES} bytes, got {actual}; pass the "
                "site runner's round key or None"
            )
        return cls(
            KeyedRandom(derive_key(key, "batch sampling")),
            KeyedRandom(derive_key(key, "gradient noise")),
        )

    def batches(self, records: int, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield one epoch of Poisson-sampled index batches."""
        return poisson_batches(
            records,
            sample_rate=dp_sample_rate(records, batch_size),
            source=self.sampling,
        )


class _KeyedDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its noise drawn from a ``KeyedRandom``.

    Opacus draws from a torch generator unless its secure mode is on, and its
    secure mode needs ``torchcsprng``, of which the package index offers no
    version for this Python and torch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_source: KeyedRandom,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
        )
        self._noise_source = noise_source

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for parameter in self.params:
            summed = parameter.summed_grad
            # As Opacus does, noise each summed gradient once: noising it again
            # would release one sum twice under independent noise.
            if getattr(summed, "_medfed_noised", False):
                raise ValueError(
                    "the summed gradient already has noise; call zero_grad "
                    "before the next step"
                )
            noise = keyed_noise_like(summed, std, self._noise_source)
            parameter.grad = (summed + noise).view_as(parameter)
            summed._medfed_noised = True


def _positive_weight(settings: LocalTrainingSettings) -> torch.Tensor | None:
    if settings.positive_weight is None:
        return None
    return torch.tensor(settings.positive_weight)


def _optimizer_step(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    correct_gradients: GradientCorrection | None,
) -> None:
    """Take one step, applying ``correct_gradients`` to the final gradient."""
    if correct_gradients is None:
        optimizer.step()
        return
    if isinstance(optimizer, DPOptimizer):
        # DPOptimizer.step() is pre_step() (clip, noise and scale p.grad) and
        # then the wrapped SGD step (Opacus 1.6); the correction goes between
        # them. pre_step() returns False when Opacus skips the step.
        if optimizer.pre_step():
            correct_gradients(model)
            optimizer.original_optimizer.step()
        return
    correct_gradients(model)
    optimizer.step()


def _sgd(model: nn.Module, settings: LocalTrainingSettings) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(),
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
