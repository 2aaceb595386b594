"""Logit adjustment: each site shifts its logits by its own label prior.

Under DP the site counts its labels once, with Gaussian noise, and its
ledger composes that count with the DP-SGD steps.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant

from medfed.contract.config import StudyConfig, parse_study_config
from medfed.contract.models import build_model
from medfed.errors import ConfigError
from medfed.sites.privacy import PrivacyLedger
from medfed.sites.runner import SiteRunner
from medfed.sites.training import LocalTrainingSettings, train_locally
from tests.conftest import CONFIGS


def make_ledger(**overrides: object) -> PrivacyLedger:
    parameters: dict[str, object] = {
        "study": "study",
        "site": "site-a",
        "epsilon": 2.0,
        "delta": 1e-5,
        "sample_rate": 32 / 400,
        "steps_per_round": 12,
        "planned_rounds": 5,
        "max_grad_norm": 1.0,
        "accountant": "rdp",
    }
    parameters.update(overrides)
    return PrivacyLedger.calibrate(**parameters)  # type: ignore[arg-type]


def test_label_count_composed_with_steps() -> None:
    ledger = make_ledger(label_counts=(300, 100), label_count_noise=5.0)
    ledger.record_round(1, ledger.steps_per_round)

    reference = RDPAccountant()
    reference.history = [
        (5.0, 1.0, 1),
        (ledger.noise_multiplier, ledger.sample_rate, ledger.steps_per_round),
    ]
    assert ledger.epsilon_spent() == pytest.approx(
        reference.get_epsilon(delta=1e-5), rel=1e-9
    )


def test_calibration_leaves_room_for_counts() -> None:
    plain = make_ledger()
    counted = make_ledger(label_counts=(300, 100), label_count_noise=4.0)
    counted.steps_spent = counted.steps_per_round * counted.planned_rounds

    assert counted.noise_multiplier > plain.noise_multiplier
    assert 2.0 - 0.01 <= counted.epsilon_spent() <= 2.0


def test_label_count_free_before_training() -> None:
    ledger = make_ledger(label_counts=(300, 100), label_count_noise=5.0)

    assert ledger.epsilon_spent() == 0.0


def test_budget_spending_count_rejected() -> None:
    with pytest.raises(ConfigError, match="label_count_noise"):
        make_ledger(epsilon=0.5, label_counts=(300, 100), label_count_noise=0.05)


def test_noisy_counts_survive_reload(tmp_path: Path) -> None:
    ledger = make_ledger(label_counts=(300, 100), label_count_noise=5.0)
    path = tmp_path / "privacy-ledger.json"
    ledger.save(path)

    loaded = PrivacyLedger.load(path)

    assert loaded.noisy_label_counts == ledger.noisy_label_counts
    assert loaded.label_count_noise == 5.0
    assert ledger.noisy_label_counts is not None
    negatives, positives = ledger.noisy_label_counts
    # 40 records is 8 standard deviations of the noise.
    assert abs(negatives - 300) < 40
    assert abs(positives - 100) < 40


def test_old_ledger_still_loads(tmp_path: Path) -> None:
    # Ledgers written before logit adjustment lack both fields.
    data = json.loads(json.dumps(make_ledger().__dict__))
    del data["label_count_noise"], data["noisy_label_counts"]
    path = tmp_path / "privacy-ledger.json"
    path.write_text(json.dumps(data), encoding="utf-8")

    assert PrivacyLedger.load(path).noisy_label_counts is None


def train_bias(offset: float, *, private: bool) -> float:
    # Every record is positive, as at a site with almost no normal images.
    torch.manual_seed(0)
    model = build_model("logistic_regression", in_features=4)
    inputs = torch.randn(200, 4)
    labels = torch.ones(200)
    settings = LocalTrainingSettings(
        epochs=2,
        batch_size=20,
        learning_rate=0.5,
        logit_offset=offset,
        max_grad_norm=1.0 if private else None,
        noise_multiplier=0.0 if private else None,
    )
    train_locally(model, inputs, labels, settings, seed=3)
    bias = dict(model.named_parameters())["linear.bias"]
    return float(bias.detach())


@pytest.mark.parametrize("private", [False, True])
def test_offset_holds_one_class_bias(private: bool) -> None:
    unadjusted = train_bias(0.0, private=private)
    adjusted = train_bias(math.log(201 / 1), private=private)
    torch.manual_seed(0)
    initial = float(
        dict(build_model("logistic_regression", in_features=4).named_parameters())[
            "linear.bias"
        ].detach()
    )

    assert unadjusted - initial > 0.5
    assert abs(adjusted - initial) < 0.1 * (unadjusted - initial)


def heart_config(**training: object) -> StudyConfig:
    raw = yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    raw["study"] = "logit-adjustment"
    raw["training"].update(training)
    return parse_study_config(raw)


def site_runner(data_root: Path, state: Path, **training: object) -> SiteRunner:
    return SiteRunner(heart_config(**training), "cleveland", state, data_root=data_root)


def test_site_offset_uses_noisy_counts(data_root: Path, tmp_path: Path) -> None:
    runner = site_runner(data_root, tmp_path, logit_adjustment=1.0)
    negatives, positives = runner.train_label_counts()
    ledger = runner.ledger(negatives + positives)

    assert ledger is not None and ledger.noisy_label_counts is not None
    noisy_negatives, noisy_positives = ledger.noisy_label_counts
    assert runner.logit_offset(ledger) == pytest.approx(
        math.log((noisy_positives + 1) / (noisy_negatives + 1))
    )
    assert (noisy_negatives, noisy_positives) != (negatives, positives)


def test_ledger_without_counts_rejects_adjustment(
    data_root: Path, tmp_path: Path
) -> None:
    records = sum(site_runner(data_root, tmp_path).train_label_counts())
    site_runner(data_root, tmp_path).ledger(records)

    with pytest.raises(ConfigError, match="created without label counts"):
        site_runner(data_root, tmp_path, logit_adjustment=1.0).ledger(records)


def test_negative_logit_adjustment_rejected() -> None:
    with pytest.raises(ConfigError, match="logit_adjustment"):
        heart_config(logit_adjustment=-1)
