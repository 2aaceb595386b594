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

A ledger that cannot be read, contradicts itself or was calibrated under
other terms than the study's config (``LedgerTerms``) raises ``LedgerError``:
the site stops rather than starting again from zero.
"""

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from medfed.dp_random import KeyedRandom
from medfed.errors import BudgetExceededError, ConfigError, LedgerError

__all__ = ["LedgerTerms", "PrivacyLedger", "compute_epsilon", "ledger_advice"]

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


def ledger_advice(study: str) -> str:
    """Return what an operator does about a ledger that cannot be trusted."""
    return (
        "restore the file from the site's last backup of its state folder; do "
        "not delete it, because without it the site cannot tell what it has "
        f"spent in study {study!r}"
    )


@dataclass(frozen=True)
class LedgerTerms:
    """The values of a study's config that a site's privacy accounting depends on.

    A ledger keeps these from its calibration. A resumed or repeated study
    whose config gives other values must not train against that ledger,
    because the ledger would count its rounds under the old terms.
    """

    study: str
    site: str
    epsilon_budget: float
    delta: float
    accountant: AccountantName
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int


#: The config keys behind each term, for error messages.
_TERM_SOURCES = {
    "study": "study",
    "site": "the site id",
    "epsilon_budget": "privacy.epsilon or the site's epsilon",
    "delta": "privacy.delta or the site's delta",
    "accountant": "privacy.accountant",
    "max_grad_norm": "privacy.max_grad_norm",
    "sample_rate": "training.batch_size / the site's training records",
    "steps_per_round": "training.local_epochs x steps per epoch",
}


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
    #: SHA-256 of the trained weights last charged for each round, keyed by
    #: the round number as a string (JSON object keys are strings).
    charged_updates: dict[str, str] = field(default_factory=dict)

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
        """Read a ledger written by ``save`` and check that it is consistent.

        Raises:
            LedgerError: the file cannot be read or parsed, misses or adds a
                field, contains an out-of-range value, or lists more rounds than
                its step count covers.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LedgerError(
                f"privacy ledger {path} cannot be read ({error}); "
                + ledger_advice(path.parent.name)
            ) from None
        problem = _ledger_problem(data)
        if problem is not None:
            study = data.get("study") if isinstance(data, dict) else None
            raise LedgerError(
                f"privacy ledger {path} is invalid: {problem}; "
                + ledger_advice(study if isinstance(study, str) else path.parent.name)
            )
        return cls(**data)

    def terms(self) -> LedgerTerms:
        """Return the terms the ledger was calibrated under."""
        return LedgerTerms(
            study=self.study,
            site=self.site,
            epsilon_budget=self.epsilon_budget,
            delta=self.delta,
            accountant=self.accountant,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            steps_per_round=self.steps_per_round,
        )

    def check_terms(self, expected: LedgerTerms, path: Path) -> None:
        """Raise LedgerError unless the ledger was calibrated under ``expected``.

        ``training.rounds`` is not a term: it sized the noise multiplier, but
        the budget check counts the rounds actually spent.
        """
        recorded = asdict(self.terms())
        differences = [
            f"{name} {recorded[name]!r} in the ledger but {value!r} from "
            f"{_TERM_SOURCES[name]}"
            for name, value in asdict(expected).items()
            if not _same_term(recorded[name], value)
        ]
        if differences:
            raise LedgerError(
                f"privacy ledger {path} does not match the study config: "
                + "; ".join(differences)
                + ". Set the config back to the values the study started with, "
                "or run the new values as a new study with its own name and budget"
            )

    def save(self, path: Path) -> None:
        """Write the ledger atomically and durably.

        A crash never leaves half a file. The folder is fsynced after the
        rename, so a power loss after ``save`` returns cannot bring back the
        previous ledger while the update it charged has left the site.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

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

    def record_round(
        self, round_number: int, steps: int, update_sha256: str | None = None
    ) -> float:
        """Add a round's steps to the ledger; return the epsilon spent so far.

        ``update_sha256`` identifies the trained weights. A round trained
        again to the same weights (a retry after a crash replays bit for bit)
        is charged once, because releasing the same values twice reveals
        nothing more than releasing them once. Other weights for the same
        round are a second DP release and are charged again.
        """
        key = str(round_number)
        if update_sha256 is not None and self.charged_updates.get(key) == update_sha256:
            logger.info(
                "site %s trained round %d again to the same weights (SHA-256 %s), "
                "which are charged once",
                self.site, round_number, update_sha256,
            )  # fmt: skip
            return self.epsilon_spent()
        self.steps_spent += steps
        self.rounds_spent.append(round_number)
        if update_sha256 is not None:
            self.charged_updates[key] = update_sha256
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
    # The key comes from the operating system, so no one can replay the noise.
    draws = KeyedRandom.from_entropy().gaussian_noise((len(counts),), noise)
    return [
        max(0.0, count + float(draw)) for count, draw in zip(counts, draws, strict=True)
    ]


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


def _is_positive(value: float) -> bool:
    return 0 < value < math.inf


_NUMBER_RULES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "epsilon_budget": ("a finite number > 0", _is_positive),
    "delta": ("a number in (0, 1)", lambda value: 0 < value < 1),
    "noise_multiplier": ("a finite number > 0", _is_positive),
    "max_grad_norm": ("a finite number > 0", _is_positive),
    "sample_rate": ("a number in (0, 1]", lambda value: 0 < value <= 1),
}


def _ledger_problem(data: object) -> str | None:
    """Return what makes ``data`` an invalid ledger, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"

    known = {item.name for item in fields(PrivacyLedger)}
    # Ledgers written before these fields existed lack them. Every other
    # field is required: a ledger without steps_spent would restart at zero.
    optional = {"charged_updates", "label_count_noise", "noisy_label_counts"}
    missing = sorted(known - optional - data.keys())
    if missing:
        return f"missing fields {missing}"
    unknown = sorted(data.keys() - known)
    if unknown:
        return f"unknown fields {unknown}"

    for name in ("study", "site"):
        if not isinstance(data[name], str):
            return f"{name} must be a string, got {data[name]!r}"
    if data["accountant"] not in ("prv", "rdp"):
        return f"accountant must be 'prv' or 'rdp', got {data['accountant']!r}"
    for name, (rule, is_valid) in _NUMBER_RULES.items():
        value = data[name]
        if not _is_number(value) or not is_valid(value):
            return f"{name} must be {rule}, got {value!r}"

    for name, minimum in (("steps_per_round", 1), ("planned_rounds", 1)):
        if not _is_integer(data[name]) or data[name] < minimum:
            return f"{name} must be an integer >= {minimum}, got {data[name]!r}"
    if not _is_integer(data["steps_spent"]) or data["steps_spent"] < 0:
        return f"steps_spent must be an integer >= 0, got {data['steps_spent']!r}"
    for name in ("rounds_spent", "refusals"):
        rounds = data[name]
        if not isinstance(rounds, list) or not all(
            _is_integer(number) and number >= 0 for number in rounds
        ):
            return f"{name} must be a list of round numbers, got {rounds!r}"

    label_problem = _label_count_problem(
        data.get("label_count_noise"), data.get("noisy_label_counts")
    )
    if label_problem is not None:
        return label_problem

    charged = data.get("charged_updates", {})
    if not isinstance(charged, dict) or not all(
        isinstance(key, str) and key.isdigit() and _is_sha256(value)
        for key, value in charged.items()
    ):
        return (
            "charged_updates must map round numbers to SHA-256 hex digests, "
            f"got {charged!r}"
        )

    # Every round takes steps_per_round steps (Poisson sampling runs a fixed
    # number of steps per epoch), so fewer steps than that means steps were
    # removed from the file.
    covered = len(data["rounds_spent"]) * data["steps_per_round"]
    if data["steps_spent"] < covered:
        return (
            f"steps_spent {data['steps_spent']} is less than the "
            f"{len(data['rounds_spent'])} rounds in rounds_spent x steps_per_round "
            f"{data['steps_per_round']} = {covered}"
        )
    return None


def _label_count_problem(noise: object, counts: object) -> str | None:
    """Return what is wrong with a ledger's label-count fields, or None."""
    if noise is not None and (
        not isinstance(noise, int | float)
        or not _is_number(noise)
        or not _is_positive(noise)
    ):
        return f"label_count_noise must be null or a finite number > 0, got {noise!r}"
    if counts is not None and not (
        isinstance(counts, list)
        and len(counts) == 2
        and all(_is_number(count) and 0 <= count < math.inf for count in counts)
    ):
        return (
            "noisy_label_counts must be null or two finite numbers >= 0, "
            f"got {counts!r}"
        )
    # Counts without their noise would drop the counts' cost from epsilon.
    if (noise is None) != (counts is None):
        return (
            "label_count_noise and noisy_label_counts must both be set or both "
            f"be null, got {noise!r} and {counts!r}"
        )
    return None


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not math.isnan(value)
    )


def _is_sha256(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) == 64
        and all(character in "0123456789abcdef" for character in value)
    )


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same_term(recorded: object, expected: object) -> bool:
    if isinstance(recorded, float) and isinstance(expected, float):
        return math.isclose(recorded, expected, rel_tol=1e-12)
    return recorded == expected


def _require(condition: bool, name: str, value: object, rule: str) -> None:
    if not condition or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"privacy parameter {name} {rule}, got {value!r}")
