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
"""

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

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
) -> float:
    """Return epsilon after ``steps`` DP-SGD steps with Poisson sampling."""
    if steps == 0:
        return 0.0
    engine = create_accountant(mechanism=accountant)
    engine.history = [(noise_multiplier, sample_rate, steps)]
    with _quiet_rdp_order_warning():
        return float(engine.get_epsilon(delta=delta))


@contextmanager
def _quiet_rdp_order_warning() -> Iterator[None]:
    # Opacus warns when the best RDP order is the largest one it tries. The
    # PRV accountant uses RDP only to size its discretization domain, and an
    # RDP bound from a non-optimal order is still a valid upper bound, so the
    # warning gives a site operator nothing to act on.
    with warnings.catch_warnings():
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
    ) -> "PrivacyLedger":
        """Create a ledger whose noise multiplier spends ``epsilon`` in the plan.

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
        try:
            with _quiet_rdp_order_warning():
                sigma = get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps_per_round * planned_rounds,
                    accountant=accountant,
                    epsilon_tolerance=0.005,
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
        )


def _require(condition: bool, name: str, value: object, rule: str) -> None:
    if not condition or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"privacy parameter {name} {rule}, got {value!r}")
