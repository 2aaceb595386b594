import hashlib
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from opacus import GradSampleModule, PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from medfed.contract.config import parse_study_config
from medfed.contract.models import build_model
from medfed.dp_random import KeyedRandom
from medfed.errors import BudgetExceededError, ConfigError, LedgerError
from medfed.sites import training
from medfed.sites.privacy import PrivacyLedger
from medfed.sites.runner import NOISE_KEY_BYTES, NOISE_KEY_FILE, SiteRunner
from medfed.sites.training import (
    LocalTrainingSettings,
    dp_steps_per_epoch,
    train_locally,
)
from tests.conftest import CONFIGS


def make_ledger(**overrides: object) -> PrivacyLedger:
    parameters: dict[str, object] = {
        "study": "study",
        "site": "site-a",
        "epsilon": 1.0,
        "delta": 1e-3,
        "sample_rate": 16 / 200,
        "steps_per_round": 12,
        "planned_rounds": 5,
        "max_grad_norm": 1.0,
        "accountant": "prv",
    }
    parameters.update(overrides)
    return PrivacyLedger.calibrate(**parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_ledger_matches_opacus_accountant(mechanism: str) -> None:
    ledger = make_ledger(accountant=mechanism)
    reference = PRVAccountant() if mechanism == "prv" else RDPAccountant()

    for round_number in range(3):
        ledger.record_round(round_number, ledger.steps_per_round)
        for _ in range(ledger.steps_per_round):
            reference.step(
                noise_multiplier=ledger.noise_multiplier, sample_rate=ledger.sample_rate
            )

    assert ledger.epsilon_spent() == pytest.approx(
        reference.get_epsilon(delta=1e-3), rel=1e-9
    )


def test_ledger_matches_privacy_engine_after_training() -> None:
    # 192 records in batches of 16: Opacus' make_private derives the sample
    # rate 1/12 from the 12 batches, and medfed derives 16/192 from the batch.
    torch.manual_seed(0)
    inputs = torch.randn(192, 15)
    labels = (inputs[:, 0] > 0).float()
    ledger = make_ledger(sample_rate=16 / 192)

    model = build_model("logistic_regression", in_features=15)
    result = train_locally(
        model,
        inputs,
        labels,
        LocalTrainingSettings(
            epochs=1,
            batch_size=16,
            learning_rate=0.1,
            max_grad_norm=1.0,
            noise_multiplier=ledger.noise_multiplier,
        ),
        seed=3,
    )
    ledger.record_round(0, result.steps)

    engine = PrivacyEngine(accountant="prv")
    reference_model = build_model("logistic_regression", in_features=15)
    _, optimizer, loader = engine.make_private(
        module=reference_model,
        optimizer=torch.optim.SGD(reference_model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(inputs, labels), batch_size=16),
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=1.0,
    )
    for batch_inputs, batch_labels in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            reference_model(batch_inputs), batch_labels
        )
        loss.backward()
        optimizer.step()

    assert result.steps == dp_steps_per_epoch(192, 16) == len(loader)
    assert loader.sample_rate == pytest.approx(ledger.sample_rate)
    assert ledger.epsilon_spent() == pytest.approx(
        engine.get_epsilon(delta=1e-3), rel=1e-9
    )


def test_calibration_spends_budget_within_plan() -> None:
    ledger = make_ledger(planned_rounds=4)

    for round_number in range(4):
        ledger.check_next_round(round_number)
        ledger.record_round(round_number, ledger.steps_per_round)

    assert ledger.epsilon_spent() <= 1.0
    assert ledger.epsilon_spent() >= 0.99


def test_round_past_plan_is_rejected(tmp_path: Path) -> None:
    ledger = make_ledger(planned_rounds=2)
    for round_number in range(2):
        ledger.record_round(round_number, ledger.steps_per_round)
    ledger.save(tmp_path / "ledger.json")

    reloaded = PrivacyLedger.load(tmp_path / "ledger.json")
    with pytest.raises(BudgetExceededError) as raised:
        reloaded.check_next_round(2)

    message = str(raised.value)
    assert "site 'site-a' rejects round 2 of study 'study'" in message
    assert "over its budget of 1.0 at delta 0.001" in message
    assert reloaded.refusals == [2]
    assert reloaded.steps_spent == 2 * ledger.steps_per_round


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("epsilon", 0.0, "privacy parameter epsilon must be > 0, got 0.0"),
        ("delta", 1.5, "privacy parameter delta must be in (0, 1), got 1.5"),
        (
            "sample_rate",
            0.0,
            "privacy parameter sample_rate must be in (0, 1], got 0.0",
        ),
        (
            "max_grad_norm",
            -1.0,
            "privacy parameter max_grad_norm must be > 0, got -1.0",
        ),
    ],
)
def test_invalid_privacy_parameters(name: str, value: float, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_ledger(**{name: value})
    assert str(raised.value) == expected


def test_dp_noise_has_calibrated_scale() -> None:
    # With all-zero inputs, labels 0.5 and a zero model, every per-record
    # gradient is exactly zero, so the whole parameter change is DP noise:
    # -learning_rate * N(0, (sigma * C)^2) / expected_batch_size per weight.
    features, records, sigma, clip, rate = 20_000, 64, 2.0, 0.5, 1.0
    model = build_model("logistic_regression", in_features=features)
    torch.nn.init.zeros_(model.linear.weight)
    torch.nn.init.zeros_(model.linear.bias)
    settings = LocalTrainingSettings(
        epochs=1,
        batch_size=records,
        learning_rate=rate,
        max_grad_norm=clip,
        noise_multiplier=sigma,
    )

    train_locally(
        model,
        torch.zeros(records, features),
        torch.full((records,), 0.5),
        settings,
        seed=11,
    )

    change = model.linear.weight.detach().flatten()
    expected_std = rate * sigma * clip / records
    assert change.mean().abs() < 0.05 * expected_std
    assert change.std().item() == pytest.approx(expected_std, rel=0.03)


def train_noise_only(
    *, seed: int, dp_key: bytes | None, private: bool = True
) -> torch.Tensor:
    """Train a zero model one DP epoch on 32 equal records; return its weight."""
    model = build_model("logistic_regression", in_features=8)
    torch.nn.init.zeros_(model.linear.weight)
    torch.nn.init.zeros_(model.linear.bias)
    settings = LocalTrainingSettings(
        epochs=1,
        batch_size=8,
        learning_rate=1.0,
        max_grad_norm=1.0 if private else None,
        noise_multiplier=1.0 if private else None,
    )
    train_locally(
        model, torch.ones(32, 8), torch.ones(32), settings, seed=seed, dp_key=dp_key
    )
    return model.linear.weight.detach().clone()


def test_dp_noise_depends_on_key_only() -> None:
    key, other_key = bytes(32), bytes(31) + b"\x01"

    assert torch.equal(
        train_noise_only(seed=5, dp_key=key), train_noise_only(seed=5, dp_key=key)
    )
    # The noise does not depend on the seed, so the seed reveals no noise.
    assert torch.equal(
        train_noise_only(seed=5, dp_key=key), train_noise_only(seed=6, dp_key=key)
    )
    assert not torch.equal(
        train_noise_only(seed=5, dp_key=key), train_noise_only(seed=5, dp_key=other_key)
    )


@pytest.mark.parametrize(
    ("key", "message"), [(bytes(31), "got 31 bytes"), ("k" * 32, "got <class 'str'>")]
)
def test_invalid_dp_key_rejected(key: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"dp_key must be 32 bytes, {message}"):
        train_noise_only(seed=5, dp_key=key)  # type: ignore[arg-type]


def test_dp_noise_without_key_is_fresh() -> None:
    torch.manual_seed(0)
    first = train_noise_only(seed=5, dp_key=None)
    torch.manual_seed(0)
    second = train_noise_only(seed=5, dp_key=None)

    assert not torch.equal(first, second)


def test_dp_noise_ignores_torch_generators() -> None:
    # Reseeding torch's global generator leaves the noise unchanged.
    key = bytes(32)
    torch.manual_seed(0)
    first = train_noise_only(seed=5, dp_key=key)
    torch.manual_seed(1)
    second = train_noise_only(seed=5, dp_key=key)

    assert torch.equal(first, second)


def test_opacus_path_matches_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Models that the one-pass DP-SGD step does not support train through
    # Opacus' GradSampleModule. From one key both paths draw the same batches
    # and noise, so they reach the same weights.
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    labels = (inputs[:, 0] > 0).float()
    settings = LocalTrainingSettings(
        epochs=2,
        batch_size=16,
        learning_rate=0.5,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )

    def trained_weight() -> torch.Tensor:
        torch.manual_seed(1)
        model = build_model("logistic_regression", in_features=8)
        train_locally(model, inputs, labels, settings, seed=3, dp_key=bytes(32))
        return model.linear.weight.detach().clone()

    fast = trained_weight()
    monkeypatch.setattr(training, "supports_fast_dp", lambda model: False)
    through_opacus = trained_weight()

    assert torch.allclose(fast, through_opacus, atol=1e-6)
    assert not torch.equal(fast, torch.zeros_like(fast))


def test_noise_not_recoverable_from_config(tmp_path: Path) -> None:
    # An attacker who has the study config and the envelope's sample count
    # trains a model of the same shape on all-zero records with the seed the
    # config gives. Zero inputs give zero weight gradients, so the attacker's
    # weight update is the site's noise alone, and subtracting it must not
    # leave the site's noise-free update.
    config = parse_study_config(
        yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    )
    runner = SiteRunner(config, "cleveland", tmp_path)
    # A fixed site key makes the noise, and so the checks below, repeatable.
    runner.study_dir.mkdir(parents=True)
    (runner.study_dir / NOISE_KEY_FILE).write_bytes(bytes(range(NOISE_KEY_BYTES)))
    records, features = 120, 15
    torch.manual_seed(123)
    inputs = torch.randn(records, features)
    labels = (inputs[:, 0] > 0).float()

    def weight_update(
        data: torch.Tensor,
        targets: torch.Tensor,
        sigma: float,
        seed: int,
        key: bytes,
    ) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model("logistic_regression", in_features=features)
        start = model.linear.weight.detach().clone()
        # One batch of every record, so one DP-SGD step.
        settings = LocalTrainingSettings(
            epochs=1,
            batch_size=records,
            learning_rate=1.0,
            max_grad_norm=1.0,
            noise_multiplier=sigma,
        )
        train_locally(model, data, targets, settings, seed=seed, dp_key=key)
        return model.linear.weight.detach() - start

    site_seed, key = runner._randomness(3)
    released = weight_update(inputs, labels, 5.0, site_seed, key)
    noise_free = weight_update(inputs, labels, 1e-12, site_seed, key)
    public_seed = zlib.crc32(
        f"{config.training.seed}:{config.study}:cleveland:3".encode()
    )
    # The attacker's best guess at the key: one derived from the public seed.
    guessed_key = hashlib.sha256(str(public_seed).encode()).digest()
    noise = weight_update(
        torch.zeros(records, features),
        torch.zeros(records),
        5.0,
        public_seed,
        guessed_key,
    )

    assert (released - noise_free).norm() > 0.1
    assert (released - noise - noise_free).abs().max() > 1e-3


def test_noise_key_private_and_kept(tmp_path: Path) -> None:
    config = parse_study_config(
        yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    )
    randomness = SiteRunner(config, "cleveland", tmp_path)._randomness(3)
    key_path = tmp_path / "studies" / config.study / NOISE_KEY_FILE

    assert key_path.stat().st_mode & 0o777 == 0o600
    assert len(key_path.read_bytes()) == NOISE_KEY_BYTES
    # A resumed site reads the same key, so a retried round replays.
    assert SiteRunner(config, "cleveland", tmp_path)._randomness(3) == randomness
    other = SiteRunner(config, "cleveland", tmp_path / "other")._randomness(3)
    assert other[0] != randomness[0]
    assert other[1] != randomness[1]


def test_seed_without_dp_needs_no_key(tmp_path: Path) -> None:
    raw = yaml.safe_load((CONFIGS / "heart_disease_nodp.yaml").read_text())
    config = parse_study_config(raw)

    first = SiteRunner(config, "cleveland", tmp_path / "a")._randomness(3)
    second = SiteRunner(config, "cleveland", tmp_path / "b")._randomness(3)

    assert first == second
    assert first[1] is None
    assert not list(tmp_path.rglob(NOISE_KEY_FILE))


def test_damaged_noise_key_rejected(tmp_path: Path) -> None:
    config = parse_study_config(
        yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    )
    key_path = tmp_path / "studies" / config.study / NOISE_KEY_FILE
    key_path.parent.mkdir(parents=True)
    key_path.write_bytes(b"short")

    with pytest.raises(LedgerError, match=r"dp-noise\.key has 5 bytes"):
        SiteRunner(config, "cleveland", tmp_path)._seed(3)
    assert key_path.read_bytes() == b"short"


def test_keyed_optimizer_noises_each_sum_once() -> None:
    # A second add_noise on one summed gradient would release that sum twice
    # under independent noise, so it raises as Opacus' DPOptimizer does.
    model = build_model("logistic_regression", in_features=4)
    wrapped = GradSampleModule(model)
    optimizer = training._KeyedDPOptimizer(
        torch.optim.SGD(wrapped.parameters(), lr=0.1),
        noise_source=KeyedRandom(bytes(32)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    torch.nn.functional.binary_cross_entropy_with_logits(
        wrapped(torch.ones(4, 4)), torch.ones(4)
    ).backward()
    optimizer.clip_and_accumulate()
    optimizer.add_noise()

    with pytest.raises(ValueError, match="already has noise; call zero_grad"):
        optimizer.add_noise()
