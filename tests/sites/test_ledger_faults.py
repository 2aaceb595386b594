"""A site's privacy ledger under damage, rollback and config changes.

The site must never train on a ledger that undercounts what it released.
An unreadable, edited, rolled-back or deleted ledger stops the site, and so
does a config whose accounting terms differ from the ledger's. The error
names the ledger file, and the file stays as it was. The service runs as a
uvicorn process on 127.0.0.1; the sites are ``SiteRunner`` objects on the
real heart-disease files.
"""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from medfed.aggregation.security import KILL_BEFORE_AUDIT_VARIABLE
from medfed.contract.config import StudyConfig, parse_study_config
from medfed.errors import LedgerError, ServiceError
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient
from medfed.sites.privacy import PrivacyLedger, compute_epsilon
from medfed.sites.runner import (
    SiteRunner,
    initial_model_weights,
    weights_to_safetensors,
)
from tests.conftest import CONFIGS
from tests.study_service import create_study

STUDY = "ledger-faults"


def make_config(**changes: dict[str, Any]) -> StudyConfig:
    """Return a 3-round DP study of one local epoch, with ``changes`` per section."""
    raw = yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    raw["study"] = STUDY
    raw["training"].update(rounds=3, local_epochs=1)
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return parse_study_config(raw)


def run_round(client: AggregationClient, runner: SiteRunner, number: int) -> None:
    client.open_round(
        STUDY, number, sites=[runner.site_id], quorum=1, deadline_seconds=300
    )
    report = runner.train_round(client, number)
    assert report.status == "uploaded", report.message
    assert client.finalize(STUDY, number)["state"] == "finalized"


def saved_ledger(tmp_path: Path) -> Path:
    """Write a ledger that has spent two rounds and return its path."""
    ledger = PrivacyLedger.calibrate(
        study=STUDY,
        site="cleveland",
        epsilon=1.0,
        delta=1e-3,
        sample_rate=16 / 200,
        steps_per_round=12,
        planned_rounds=5,
        max_grad_norm=1.0,
    )
    ledger.record_round(0, 12)
    ledger.record_round(1, 12)
    path = tmp_path / "studies" / STUDY / "privacy-ledger.json"
    ledger.save(path)
    return path


def edit(path: Path, **fields: object) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda path: path.write_text(""), "cannot be read"),
        (lambda path: path.write_bytes(path.read_bytes()[:40]), "cannot be read"),
        (lambda path: path.write_bytes(b"\xff\xfe\x00"), "cannot be read"),
        (lambda path: path.write_text("[]"), "expected a JSON object, got list"),
        (
            lambda path: edit(path, steps_spent=0),
            "steps_spent 0 is less than the 2 rounds in rounds_spent",
        ),
        (
            lambda path: edit(path, steps_spent=-5),
            "steps_spent must be an integer >= 0, got -5",
        ),
        (
            lambda path: edit(path, steps_spent=True),
            "steps_spent must be an integer >= 0, got True",
        ),
        (
            lambda path: edit(path, epsilon_budget=float("nan")),
            "epsilon_budget must be a finite number > 0, got nan",
        ),
        (
            lambda path: edit(path, epsilon_budget=1e400),
            "epsilon_budget must be a finite number > 0, got inf",
        ),
        (
            lambda path: edit(path, noise_multiplier=0),
            "noise_multiplier must be a finite number > 0, got 0",
        ),
        (
            lambda path: edit(path, delta=1),
            "delta must be a number in (0, 1), got 1",
        ),
        (
            lambda path: edit(path, sample_rate="0.08"),
            "sample_rate must be a number in (0, 1], got '0.08'",
        ),
        (
            lambda path: edit(path, accountant="gdp"),
            "accountant must be 'prv' or 'rdp', got 'gdp'",
        ),
        (
            lambda path: edit(path, rounds_spent=[0, "1"]),
            "rounds_spent must be a list of round numbers",
        ),
        (lambda path: edit(path, spent_before=3), "unknown fields ['spent_before']"),
        (
            lambda path: edit(path, noisy_label_counts=[80.2, 40.9]),
            "label_count_noise and noisy_label_counts must both be set",
        ),
        (
            lambda path: edit(
                path, label_count_noise=-1.0, noisy_label_counts=[80.2, 40.9]
            ),
            "label_count_noise must be null or a finite number > 0, got -1.0",
        ),
        (
            lambda path: edit(path, label_count_noise=10.0, noisy_label_counts=[3]),
            "noisy_label_counts must be null or two finite numbers >= 0",
        ),
        (
            lambda path: edit(path, charged_updates={"0": "not-a-digest"}),
            "charged_updates must map round numbers to SHA-256 hex digests",
        ),
    ],
)
def test_damaged_ledger_rejected(tmp_path: Path, damage: Any, expected: str) -> None:
    path = saved_ledger(tmp_path)
    damage(path)
    damaged = path.read_bytes()

    with pytest.raises(LedgerError) as raised:
        PrivacyLedger.load(path)

    message = str(raised.value)
    assert f"privacy ledger {path}" in message
    assert expected in message
    assert "restore the file from the site's last backup" in message
    assert path.read_bytes() == damaged


def test_ledger_missing_field_rejected(tmp_path: Path) -> None:
    path = saved_ledger(tmp_path)
    data = json.loads(path.read_text())
    del data["steps_spent"]
    path.write_text(json.dumps(data))

    with pytest.raises(LedgerError, match=r"missing fields \['steps_spent'\]"):
        PrivacyLedger.load(path)


@pytest.mark.parametrize(
    ("section", "change", "expected"),
    [
        ("training", {"batch_size": 32}, "sample_rate 0.0"),
        ("training", {"local_epochs": 5}, "steps_per_round 1"),
        ("privacy", {"epsilon": 0.5}, "epsilon_budget 1.0 in the ledger but 0.5"),
        ("privacy", {"epsilon": 5.0}, "epsilon_budget 1.0 in the ledger but 5.0"),
        ("privacy", {"delta": 1e-2}, "delta 0.001 in the ledger but 0.01"),
        ("privacy", {"accountant": "rdp"}, "accountant 'prv' in the ledger but 'rdp'"),
        (
            "privacy",
            {"max_grad_norm": 2.0},
            "max_grad_norm 1.0 in the ledger but 2.0",
        ),
    ],
)
def test_changed_config_rejected_on_resume(
    tmp_path: Path,
    data_root: Path,
    service: AggregationClient,
    section: str,
    change: dict[str, Any],
    expected: str,
) -> None:
    config = make_config()
    create_study(service, config)
    run_round(service, SiteRunner(config, "cleveland", tmp_path, data_root), 0)
    changed = make_config(**{section: change})
    runner = SiteRunner(changed, "cleveland", tmp_path, data_root)
    before = runner.ledger_path.read_bytes()

    service.open_round(STUDY, 1, sites=["cleveland"], quorum=1, deadline_seconds=300)
    with pytest.raises(LedgerError) as raised:
        runner.train_round(service, 1)

    message = str(raised.value)
    assert f"privacy ledger {runner.ledger_path} does not match" in message
    assert expected in message
    assert "Set the config back to the values the study started with" in message
    assert runner.ledger_path.read_bytes() == before
    assert service.round_status(STUDY, 1)["uploaded"] == []


def test_disabling_dp_rejected_on_resume(
    tmp_path: Path, data_root: Path, service: AggregationClient
) -> None:
    config = make_config()
    create_study(service, config)
    run_round(service, SiteRunner(config, "cleveland", tmp_path, data_root), 0)
    without_dp = SiteRunner(
        make_config(privacy={"enabled": False}), "cleveland", tmp_path, data_root
    )

    service.open_round(STUDY, 1, sites=["cleveland"], quorum=1, deadline_seconds=300)
    with pytest.raises(LedgerError, match=r"privacy\.enabled: false"):
        without_dp.train_round(service, 1)

    assert service.round_status(STUDY, 1)["uploaded"] == []


def test_rolled_back_ledger_rejected(
    tmp_path: Path, data_root: Path, service: AggregationClient
) -> None:
    config = make_config()
    create_study(service, config)
    runner = SiteRunner(config, "cleveland", tmp_path, data_root)
    run_round(service, runner, 0)
    backup = tmp_path / "ledger-after-round-0.json"
    shutil.copy(runner.ledger_path, backup)
    run_round(service, runner, 1)

    # The operator restores the copy taken after round 0: it is a valid
    # ledger, but it charges nothing for round 1, which the site released.
    shutil.copy(backup, runner.ledger_path)
    service.open_round(STUDY, 2, sites=["cleveland"], quorum=1, deadline_seconds=300)
    with pytest.raises(LedgerError) as raised:
        runner.train_round(service, 2)

    message = str(raised.value)
    assert (
        f"privacy ledger {runner.ledger_path} charges no update for round 1" in message
    )
    assert "the aggregation service accepted one from this site" in message
    assert runner.ledger_path.read_bytes() == backup.read_bytes()
    assert service.round_status(STUDY, 2)["uploaded"] == []


MASKING = {"mode": "masking", "clip": 10.0, "max_weight": 1000}


def run_masking_round(
    client: AggregationClient, runners: list[SiteRunner], number: int
) -> dict[str, Any]:
    """Train every site of a masking round at once and return the final status."""
    client.open_round(
        STUDY,
        number,
        sites=[runner.site_id for runner in runners],
        quorum=len(runners),
        deadline_seconds=300,
    )
    with ThreadPoolExecutor(len(runners)) as pool:
        reports = list(pool.map(lambda site: site.train_round(client, number), runners))
    assert [report.status for report in reports] == ["uploaded"] * len(runners)
    status = client.finalize(STUDY, number)
    assert status["state"] == "finalized", status["reason"]
    return status


@pytest.mark.parametrize("rollback", ["restored", "deleted"])
def test_masking_ledger_rollback_rejected(
    tmp_path: Path, data_root: Path, service: AggregationClient, rollback: str
) -> None:
    config = make_config(secure_aggregation=MASKING)
    create_study(service, config)
    runners = [
        SiteRunner(config, site.id, tmp_path / site.id, data_root)
        for site in config.sites
    ]
    cleveland = runners[0]
    run_masking_round(service, runners, 0)
    backup = tmp_path / "ledger-after-round-0.json"
    shutil.copy(cleveland.ledger_path, backup)
    status = run_masking_round(service, runners, 1)
    assert status["uploaded"] == sorted(site.id for site in config.sites)

    if rollback == "restored":
        shutil.copy(backup, cleveland.ledger_path)
    else:
        cleveland.ledger_path.unlink()
    # The restored copy does not charge round 1. A deleted ledger charges no
    # round, so round 0 is the first one missing.
    missing = 1 if rollback == "restored" else 0
    sites = [site.id for site in config.sites]
    service.open_round(STUDY, 2, sites=sites, quorum=len(sites), deadline_seconds=300)
    with pytest.raises(LedgerError) as raised:
        cleveland.train_round(service, 2)

    assert f"charges no update for round {missing} of study" in str(raised.value)
    if rollback == "restored":
        assert cleveland.ledger_path.read_bytes() == backup.read_bytes()
    progress = service.round_status(STUDY, 2)["masking"]
    assert "cleveland" not in progress["advertised"]


def test_deleted_ledger_rejected(
    tmp_path: Path, data_root: Path, service: AggregationClient
) -> None:
    config = make_config()
    create_study(service, config)
    runner = SiteRunner(config, "cleveland", tmp_path, data_root)
    run_round(service, runner, 0)

    runner.ledger_path.unlink()
    service.open_round(STUDY, 1, sites=["cleveland"], quorum=1, deadline_seconds=300)
    with pytest.raises(LedgerError, match="charges no update for round 0"):
        runner.train_round(service, 1)

    assert service.round_status(STUDY, 1)["uploaded"] == []


def test_deleted_ledger_with_site_state_rejected(
    tmp_path: Path, data_root: Path, service: AggregationClient
) -> None:
    config = make_config(strategy={"local_layers": ["linear.bias"]})
    create_study(service, config)
    runner = SiteRunner(config, "cleveland", tmp_path, data_root)
    run_round(service, runner, 0)
    assert runner.local_layers_path.exists()

    runner.ledger_path.unlink()
    records = int(runner.prepare()["splits"]["train"]["rows"])
    with pytest.raises(LedgerError) as raised:
        runner.ledger(records)

    message = str(raised.value)
    assert f"privacy ledger {runner.ledger_path} is missing" in message
    assert "local-layers.safetensors" in message
    assert not runner.ledger_path.exists()


def test_ledger_charges_every_released_round(
    tmp_path: Path, data_root: Path, service: AggregationClient
) -> None:
    config = make_config()
    create_study(service, config)
    runner = SiteRunner(config, "cleveland", tmp_path, data_root)
    for number in range(2):
        run_round(service, runner, number)

    ledger = PrivacyLedger.load(runner.ledger_path)
    released = [
        number
        for number in range(2)
        if "cleveland" in service.round_status(STUDY, number)["uploaded"]
    ]
    assert ledger.rounds_spent == released
    assert ledger.epsilon_spent() == compute_epsilon(
        noise_multiplier=ledger.noise_multiplier,
        sample_rate=ledger.sample_rate,
        steps=len(released) * ledger.steps_per_round,
        delta=ledger.delta,
        accountant="prv",
    )


def test_retried_round_charged_once(tmp_path: Path, data_root: Path) -> None:
    config = make_config()
    runner = SiteRunner(config, "cleveland", tmp_path / "site", data_root)
    state_dir = tmp_path / "aggregation"

    # The first service takes the study's initial model (400 bytes) but
    # rejects the update's larger envelope (413), after the site trained and
    # charged the round.
    with (
        LocalAggregationService(state_dir, max_upload_bytes=450) as small,
        AggregationClient(small.url) as client,
    ):
        create_study(client, config)
        client.open_round(STUDY, 0, sites=["cleveland"], quorum=1, deadline_seconds=300)
        with pytest.raises(ServiceError, match="413"):
            runner.train_round(client, 0)
    charged = PrivacyLedger.load(runner.ledger_path)
    assert charged.rounds_spent == [0]

    # The retry trains the same weights again, so the ledger charges them once.
    with (
        LocalAggregationService(state_dir, max_upload_bytes=1 << 20) as large,
        AggregationClient(large.url) as client,
    ):
        report = runner.train_round(client, 0)
        uploaded = client.round_status(STUDY, 0)["uploaded"]
    retried = PrivacyLedger.load(runner.ledger_path)
    assert report.status == "uploaded"
    assert uploaded == ["cleveland"]
    assert retried.rounds_spent == [0]
    assert retried.steps_spent == charged.steps_spent
    assert retried.charged_updates == charged.charged_updates


def test_lost_upload_response_charged_once(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config()
    runner = SiteRunner(config, "cleveland", tmp_path / "site", data_root)
    state_dir = tmp_path / "aggregation"

    # The service kills itself right after it stored the upload, so the
    # site gets a failed upload of an update that was released.
    monkeypatch.setenv(KILL_BEFORE_AUDIT_VARIABLE, "update.accepted")
    with (
        LocalAggregationService(state_dir, max_upload_bytes=1 << 20) as first,
        AggregationClient(first.url) as client,
    ):
        create_study(client, config)
        client.open_round(STUDY, 0, sites=["cleveland"], quorum=1, deadline_seconds=300)
        with pytest.raises(ServiceError, match="unreachable"):
            runner.train_round(client, 0)
    charged = PrivacyLedger.load(runner.ledger_path)

    # A retried round sends a new envelope (a new nonce), which the service
    # rejects (409) next to the stored one. The site released one update,
    # and its ledger charges one.
    monkeypatch.delenv(KILL_BEFORE_AUDIT_VARIABLE)
    with (
        LocalAggregationService(state_dir, max_upload_bytes=1 << 20) as second,
        AggregationClient(second.url) as client,
    ):
        with pytest.raises(ServiceError, match="already uploaded a different update"):
            runner.train_round(client, 0)
        uploaded = client.round_status(STUDY, 0)["uploaded"]
    retried = PrivacyLedger.load(runner.ledger_path)
    assert uploaded == ["cleveland"]
    assert charged.rounds_spent == [0]
    assert retried.rounds_spent == [0]
    assert retried.steps_spent == charged.steps_spent


def test_other_weights_charged_again(tmp_path: Path) -> None:
    path = saved_ledger(tmp_path)
    ledger = PrivacyLedger.load(path)
    ledger.record_round(2, 12, update_sha256="a" * 64)
    once = ledger.steps_spent

    ledger.record_round(2, 12, update_sha256="a" * 64)
    assert ledger.steps_spent == once
    ledger.record_round(2, 12, update_sha256="b" * 64)
    assert ledger.steps_spent == once + 12
    ledger.record_round(2, 12)
    assert ledger.steps_spent == once + 24
    assert ledger.rounds_spent == [0, 1, 2, 2, 2]


def test_ledger_without_newer_fields_loads(tmp_path: Path) -> None:
    # Ledgers written before these fields existed lack them.
    path = saved_ledger(tmp_path)
    data = json.loads(path.read_text())
    for name in ("charged_updates", "label_count_noise", "noisy_label_counts"):
        del data[name]
    path.write_text(json.dumps(data))

    loaded = PrivacyLedger.load(path)

    assert loaded.charged_updates == {}
    assert loaded.label_count_noise is None
    assert loaded.noisy_label_counts is None


def test_rolled_back_asynchronous_ledger_rejected(
    tmp_path: Path, data_root: Path, service: AggregationClient
) -> None:
    config = make_config(round={"asynchronous": {"buffer_size": 1}})
    settings = {
        "sites": [site.id for site in config.sites],
        "strategy": "fedavg",
        "asynchronous": {"buffer_size": 1, "max_versions": 3},
    }
    service.create_study(
        STUDY,
        weights_to_safetensors(
            initial_model_weights(config),
            metadata={"medfed_study_settings": json.dumps(settings)},
        ),
    )
    runner = SiteRunner(config, "cleveland", tmp_path, data_root)
    assert runner.train_asynchronous(service, 0).status == "uploaded"
    backup = tmp_path / "ledger-after-update-0.json"
    shutil.copy(runner.ledger_path, backup)
    assert runner.train_asynchronous(service, 1).status == "uploaded"

    shutil.copy(backup, runner.ledger_path)
    with pytest.raises(LedgerError) as raised:
        runner.train_asynchronous(service, 2)

    message = str(raised.value)
    assert f"privacy ledger {runner.ledger_path} charges 1 updates" in message
    assert "the aggregation service accepted 2 from this site" in message
    assert runner.ledger_path.read_bytes() == backup.read_bytes()
    arrivals = service.asynchronous_status(STUDY)["arrivals"]
    assert len(arrivals) == 2
