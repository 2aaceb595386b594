"""The site's privacy ledger: its DP budget, calibration and spending.

Each site owns one ledger per study, persisted as JSON in its state directory.
The noise multiplier is calibrated once, when the ledger is created, for the
study's planned rounds x local epochs, and never changes afterwards. Before a
round the site calls ``check_next_round``: if the projected epsilon after that
round would exceed the budget, it raises ``BudgetExceededError`` and the site
does not train. Spending is recorded after local training and before the
update leaves the site, because the release is what costs privacy.

Epsilon comes from Opacus' accountants (PRV by default, RDP as a fallback),
fed the history of (noise multiplier, sample rate, steps).

A study with logit adjustment also counts each site's training labels once,
with Gaussian noise (``noisy_label_counts``), because the counts shape every
record's loss. Changing one record moves one count by one, so that count is
a Gaussian mechanism of sensitivity 1; the ledger composes it with the
DP-SGD steps as one more entry of the history, at sample rate 1, from the
first round on.
"""

import json
import logging
import math
import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from medfed.errors import BudgetExceededError, ConfigError

__all__ = ["PrivacyLedger", "compute_epsilon"]

logger = logging.getLogger(__name__)

AccountantName = Literal["prv", "rdp"]


def compute_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName,
    label_count_noise: float | None = None,
) -> float:
    """Return epsilon after ``steps`` DP-SGD steps with Poisson sampling.

    With ``label_count_noise``, the steps follow one release of the label
    counts with Gaussian noise of that standard deviation (sensitivity 1).
    """
    if steps == 0:
        return 0.0
    engine = create_accountant(mechanism=accountant)
    engine.history = [(noise_multiplier, sample_rate, steps)]
    if label_count_noise is not None:
        engine.history.insert(0, (label_count_noise, 1.0, 1))
    with _quiet_rdp_order_warning():
        return float(engine.get_epsilon(delta=delta))


@contextmanager
def _quiet_rdp_order_warning() -> Iterator[None]:
    # Opacus warns when the best RDP order is the largest one it tries. The
    # PRV accountant uses RDP only to size its discretization domain, and an
    # RDP bound from a non-optimal order is still a valid upper bound, so the
    # warning gives a site operator nothing to act on. At sample rate 1 (a
    # site smaller than its batch, or the label counts) the PRV takes the log
    # of 1 - q = 0 in a branch that np.where then discards.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


@dataclass
class PrivacyLedger:
    """A site's (epsilon, delta) budget for one study and what it has spent."""

    study: str
    site: str
    epsilon_budget: float
    delta: float
    accountant: AccountantName
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    steps_spent: int = 0
    rounds_spent: list[int] = field(default_factory=list)
    refusals: list[int] = field(default_factory=list)
    #: Standard deviation, in records, of the noise on the label counts that
    #: logit adjustment uses; None when the study does not count labels.
    label_count_noise: float | None = None
    #: The negative and positive training labels, counted once with that
    #: noise and never again, so the count costs privacy only once.
    noisy_label_counts: list[float] | None = None

    @classmethod
    def calibrate(
        cls,
        *,
        study: str,
        site: str,
        epsilon: float,
        delta: float,
        sample_rate: float,
        steps_per_round: int,
        planned_rounds: int,
        max_grad_norm: float,
        accountant: AccountantName = "prv",
        label_counts: tuple[int, int] | None = None,
        label_count_noise: float | None = None,
    ) -> "PrivacyLedger":
        """Create a ledger whose noise multiplier spends ``epsilon`` in the plan.

        With ``label_counts`` (negatives, positives) and ``label_count_noise``,
        the ledger draws the noisy counts now and calibrates the noise
        multiplier so that the counts and the planned steps together spend
        ``epsilon``.

        Raises:
            ConfigError: a parameter is out of range, or no noise multiplier
                reaches the budget.
        """
        _require(epsilon > 0, "epsilon", epsilon, "must be > 0")
        _require(0 < delta < 1, "delta", delta, "must be in (0, 1)")
        _require(0 < sample_rate <= 1, "sample_rate", sample_rate, "must be in (0, 1]")
        _require(
            steps_per_round >= 1, "steps_per_round", steps_per_round, "must be >= 1"
        )
        _require(planned_rounds >= 1, "planned_rounds", planned_rounds, "must be >= 1")
        _require(max_grad_norm > 0, "max_grad_norm", max_grad_norm, "must be > 0")
        noisy_counts = None
        if label_counts is not None:
            _require(
                label_count_noise is not None and label_count_noise > 0,
                "label_count_noise",
                label_count_noise,
                "must be > 0 when the site counts its labels",
            )
            assert label_count_noise is not None
            noisy_counts = _noisy_counts(label_counts, label_count_noise)
        else:
            label_count_noise = None
        try:
            if label_count_noise is None:
                with _quiet_rdp_order_warning():
                    sigma = get_noise_multiplier(
                        target_epsilon=epsilon,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=steps_per_round * planned_rounds,
                        accountant=accountant,
                        epsilon_tolerance=0.005,
                    )
            else:
                sigma = _noise_multiplier_after_counts(
                    epsilon=epsilon,
                    delta=delta,
                    sample_rate=sample_rate,
                    steps=steps_per_round * planned_rounds,
                    accountant=accountant,
                    label_count_noise=label_count_noise,
                )
        except ValueError as error:
            raise ConfigError(
                f"site {site!r} cannot reach epsilon {epsilon} at delta {delta}: {error}"
            ) from None
        return cls(
            study=study,
            site=site,
            epsilon_budget=epsilon,
            delta=delta,
            accountant=accountant,
            noise_multiplier=float(sigma),
            max_grad_norm=max_grad_norm,
            sample_rate=sample_rate,
            steps_per_round=steps_per_round,
            planned_rounds=planned_rounds,
            label_count_noise=label_count_noise,
            noisy_label_counts=noisy_counts,
        )

    @classmethod
    def load(cls, path: Path) -> "PrivacyLedger":
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**data)

    def save(self, path: Path) -> None:
        """Write the ledger atomically, so a crash never leaves half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def epsilon_spent(self) -> float:
        return self._epsilon_after(self.steps_spent)

    def projected_epsilon(self) -> float:
        """Return epsilon after one more round of ``steps_per_round`` steps."""
        return self._epsilon_after(self.steps_spent + self.steps_per_round)

    def check_next_round(self, round_number: int) -> None:
        """Raise BudgetExceededError if the next round would exceed the budget.

        The check adds no tolerance, so the projected epsilon must not exceed
        the budget at all.
        """
        projected = self.projected_epsilon()
        if projected > self.epsilon_budget:
            if round_number not in self.refusals:
                self.refusals.append(round_number)
            raise BudgetExceededError(
                f"site {self.site!r} rejects round {round_number} of study "
                f"{self.study!r}: it would spend epsilon {projected:.3f}, over its "
                f"budget of {self.epsilon_budget} at delta {self.delta} "
                f"(spent so far {self.epsilon_spent():.3f})"
            )

    def record_round(self, round_number: int, steps: int) -> float:
        """Add a round's steps to the ledger; return the epsilon spent so far."""
        self.steps_spent += steps
        self.rounds_spent.append(round_number)
        spent = self.epsilon_spent()
        logger.info(
            "site %s spent epsilon %.4f of %.4f after round %d",
            self.site, spent, self.epsilon_budget, round_number,
        )  # fmt: skip
        return spent

    def _epsilon_after(self, steps: int) -> float:
        return compute_epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=steps,
            delta=self.delta,
            accountant=self.accountant,
            label_count_noise=self.label_count_noise,
        )


def _noisy_counts(counts: tuple[int, int], noise: float) -> list[float]:
    # DP noise comes from the operating system's entropy, never from a seeded
    # generator that someone could replay.
    source = random.SystemRandom()
    return [max(0.0, count + source.gauss(0.0, noise)) for count in counts]


def _noise_multiplier_after_counts(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName,
    label_count_noise: float,
    tolerance: float = 0.005,
) -> float:
    """Return the smallest noise multiplier (within ``tolerance`` of epsilon)
    for which the label counts and ``steps`` steps spend at most ``epsilon``.

    Raises:
        ValueError: the label counts alone spend the budget.
    """

    def spent(sigma: float) -> float:
        return compute_epsilon(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            accountant=accountant,
            label_count_noise=label_count_noise,
        )

    low, high = 0.0, 10.0
    while spent(high) > epsilon:
        low, high = high, 2 * high
        if high > 2000:
            raise ValueError(
                f"the label counts with noise {label_count_noise} leave too little "
                "of the budget for training; raise privacy.label_count_noise"
            )
    for _ in range(60):
        middle = (low + high) / 2
        value = spent(middle)
        if value > epsilon:
            low = middle
        else:
            high = middle
            if epsilon - value < tolerance:
                break
    return high


def _require(condition: bool, name: str, value: object, rule: str) -> None:
    if not condition or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"privacy parameter {name} {rule}, got {value!r}")
