"""Short studies through the real flow: Prefect, uvicorn and MLflow."""

import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from medfed.contract.config import StudyConfig, parse_study_config
from medfed.errors import QuorumError
from medfed.flows.training import run_study
from tests.conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("prefect_api", "mlflow_uri")


def short_config(name: str, study: str, rounds: int = 2) -> tuple[StudyConfig, str]:
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / name).read_text())
    raw["study"] = study
    raw["training"]["rounds"] = rounds
    text = yaml.safe_dump(raw)
    return parse_study_config(raw), text


def test_dp_study_end_to_end(tmp_path: Path) -> None:
    config, text = short_config("heart_disease.yaml", "e2e-dp")
    rounds: list[int] = []

    summary = run_study(
        config,
        text,
        work_dir=tmp_path,
        listener=lambda number, _: rounds.append(number),
    )

    assert rounds == [0, 1]
    assert summary["rounds"] == 2
    assert summary["model_version"] == 2
    assert 0.5 <= summary["pooled_test_accuracy"] <= 1.0
    assert set(summary["sites"]) == {
        "cleveland",
        "hungary",
        "switzerland",
        "long-beach",
    }
    assert summary["sites"]["cleveland"]["train_records"] == 200
    for site, values in summary["sites"].items():
        assert 0 < values["epsilon_spent"] <= 1.0, site
    assert summary["refusals"] == []

    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["strategy"] == "fedavg"
    assert run.data.params["rounds"] == "2"
    assert float(run.data.params["cleveland.noise_multiplier"]) > 0
    assert run.data.params["switzerland.target_epsilon"] == "1.0"
    assert run.data.params["hungary.delta"] == "0.001"
    assert run.data.params["long-beach.max_grad_norm"] == "1.0"
    assert run.data.params["compression_codec"] == "fp32"
    assert run.data.params["round_mode"] == "synchronous"
    assert run.data.params["round_quorum"] == "3"
    assert run.data.params["participation_fraction"] == "1.0"
    assert run.data.params["secure_aggregation_mode"] == "none"
    history = client.get_metric_history(run.info.run_id, "pooled.test_accuracy")
    assert [point.step for point in history] == [1, 2]
    for metric in (
        "cleveland.epsilon_spent",
        "hungary.bytes_uploaded",
        "switzerland.test_accuracy",
        "pooled.test_auc",
        "long-beach.compression_ratio",
    ):
        assert client.get_metric_history(run.info.run_id, metric), metric
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id)]
    assert "study_config.yaml" in artifacts

    version = client.get_model_version("e2e-dp", summary["registered_model_version"])
    tags = version.tags
    assert tags["medfed.study"] == "e2e-dp"
    assert tags["medfed.round"] == "1"
    assert tags["medfed.sites"] == "cleveland,hungary,switzerland,long-beach"
    assert tags["medfed.strategy"] == "fedavg"
    assert tags["medfed.model_sha256"] == summary["model_sha256"]
    assert float(tags["medfed.dp.cleveland.epsilon_spent"]) <= 1.0
    assert tags["medfed.dp.cleveland.target_epsilon"] == "1.0"
    assert len(tags["medfed.dataset_fingerprint.hungary"]) == 64


def test_registered_model_loads_without_pickle(tmp_path: Path) -> None:
    config, text = short_config("heart_disease_nodp.yaml", "e2e-load", rounds=1)
    notices: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = notices.append  # type: ignore[method-assign]
    logging.getLogger("mlflow.pyfunc").addHandler(collector)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run_study(config, text, work_dir=tmp_path)
            model = mlflow.pyfunc.load_model(
                f"models:/e2e-load/{summary['registered_model_version']}"
            )
    finally:
        logging.getLogger("mlflow.pyfunc").removeHandler(collector)
    scores = model.predict([[0.0] * 15, [1.0] * 15])

    assert scores.shape == (2,)
    # MLflow warns about the predict method's type hints on every log and load.
    assert not [item for item in caught if "type hint" in str(item.message)]
    # Nor about the signature it cannot infer without an input example.
    assert not [item for item in notices if "signature" in item.getMessage()]
    assert all(0.0 <= score <= 1.0 for score in scores)


def test_site_over_budget_is_recorded_and_skipped(tmp_path: Path) -> None:
    # A first run spends the whole budget of every site. The same study run
    # again against the same hospitals must not spend it twice: Cleveland
    # keeps its ledger and rejects, the other sites start from fresh state.
    config, text = short_config("heart_disease.yaml", "e2e-budget")
    run_study(config, text, work_dir=tmp_path / "first")
    (tmp_path / "second" / "sites").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "first" / "sites" / "cleveland",
        tmp_path / "second" / "sites" / "cleveland",
    )

    summary = run_study(config, text, work_dir=tmp_path / "second")

    assert summary["rounds"] == 2
    assert [refusal["site"] for refusal in summary["refusals"]] == [
        "cleveland",
        "cleveland",
    ]
    assert (
        "site 'cleveland' rejects round 0 of study 'e2e-budget'"
        in summary["refusals"][0]["message"]
    )
    assert summary["sites"]["cleveland"]["epsilon_spent"] <= 1.0
    tags = MlflowClient().get_run(summary["mlflow_run_id"]).data.tags
    assert "over its budget of 1.0" in tags["medfed.event.refusal.cleveland.round0"]


def test_every_site_over_budget_stops_study(tmp_path: Path) -> None:
    config, text = short_config("heart_disease.yaml", "e2e-exhausted", rounds=1)
    run_study(config, text, work_dir=tmp_path / "first")
    shutil.copytree(tmp_path / "first" / "sites", tmp_path / "second" / "sites")

    with pytest.raises(QuorumError) as raised:
        run_study(config, text, work_dir=tmp_path / "second")

    assert "study 'e2e-exhausted' finished no round" in str(raised.value)
    assert "rejects round 0" in str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "minimum"),
    [("heart_disease_nodp.yaml", 0.78), ("heart_disease.yaml", 0.72)],
)
def test_full_study_reaches_accuracy(tmp_path: Path, name: str, minimum: float) -> None:
    config_path = CONFIGS / name
    from medfed.contract.config import load_study_config

    config = load_study_config(config_path)
    summary = run_study(config, config_path.read_text(), work_dir=tmp_path)

    assert summary["rounds"] == config.training.rounds
    assert summary["pooled_test_accuracy"] >= minimum
    if config.privacy.enabled:
        for site, values in summary["sites"].items():
            assert values["epsilon_spent"] <= 1.0, site
    assert not math.isnan(summary["pooled_test_auc"])


@pytest.mark.slow
def test_masking_study_matches_plain(tmp_path: Path) -> None:
    # The three studies share one name because the sites' training seeds
    # derive from it; each registers its own version of the model.
    plain_config, plain_text = short_config("heart_disease_nodp.yaml", "e2e-secagg")
    raw: dict[str, Any] = yaml.safe_load(plain_text)
    raw["secure_aggregation"] = {
        "mode": "masking",
        "clip": 10.0,
        "max_weight": 1000,
        "fractional_bits": 14,
    }
    masked_config = parse_study_config(raw)
    raw_int8 = {
        **raw,
        "secure_aggregation": {"mode": "masking", "clip": 2.0, "max_weight": 1000},
        "compression": {"codec": "int8", "params": {"scale": 2.0 / 127}},
    }
    int8_config = parse_study_config(raw_int8)

    plain = run_study(plain_config, plain_text, work_dir=tmp_path / "plain")
    masked = run_study(masked_config, yaml.safe_dump(raw), work_dir=tmp_path / "masked")
    int8 = run_study(int8_config, yaml.safe_dump(raw_int8), work_dir=tmp_path / "int8")

    # Training without DP is seeded, so the two studies differ only by the
    # fixed-point error of the mean, at most 4 * 2^-15 per coordinate.
    inputs = np.random.default_rng(0).normal(size=(50, 15)).tolist()
    plain_scores = mlflow.pyfunc.load_model(
        f"models:/e2e-secagg/{plain['registered_model_version']}"
    ).predict(inputs)
    masked_scores = mlflow.pyfunc.load_model(
        f"models:/e2e-secagg/{masked['registered_model_version']}"
    ).predict(inputs)
    assert masked["rounds"] == plain["rounds"] == 2
    assert masked["registered_model_version"] != plain["registered_model_version"]
    assert np.max(np.abs(masked_scores - plain_scores)) < 1e-4
    # int8 levels move each coordinate of the mean by less than 2/127 a
    # round, without bias.
    assert int8["rounds"] == 2
    assert abs(int8["pooled_test_accuracy"] - masked["pooled_test_accuracy"]) <= 0.01

    client = MlflowClient()
    plain_run = client.get_run(plain["mlflow_run_id"])
    assert plain_run.data.params["secure_aggregation_mode"] == "none"
    assert "hungary.secagg_wall_seconds" not in plain_run.data.metrics
    masked_params = client.get_run(masked["mlflow_run_id"]).data.params
    assert masked_params["secure_aggregation_mode"] == "masking"
    assert masked_params["secure_aggregation_threshold"] == "3"
    assert masked_params["secure_aggregation_sites"] == "4"
    assert masked_params["secure_aggregation_ring_bits"] == "32"
    assert masked_params["secure_aggregation_encoding"] == "fixed_point"
    assert masked_params["secure_aggregation_fractional_bits"] == "14"
    assert masked_params["secure_aggregation_clip"] == "10.0"
    assert masked_params["secure_aggregation_rounding"] == "nearest"
    int8_params = client.get_run(int8["mlflow_run_id"]).data.params
    assert int8_params["secure_aggregation_encoding"] == "int8"
    assert float(int8_params["secure_aggregation_int8_scale"]) == 2.0 / 127
    assert int8_params["secure_aggregation_rounding"] == "stochastic"
    assert "secure_aggregation_fractional_bits" not in int8_params

    for summary in (masked, int8):
        run_id = summary["mlflow_run_id"]
        for site in ("cleveland", "hungary", "switzerland", "long-beach"):
            sent = client.get_metric_history(
                run_id, f"{site}.secagg_message_bytes_sent"
            )
            envelope = client.get_metric_history(run_id, f"{site}.bytes_uploaded")
            total = client.get_metric_history(
                run_id, f"{site}.secagg_bytes_uploaded_total"
            )
            wall = client.get_metric_history(run_id, f"{site}.secagg_wall_seconds")
            compute = client.get_metric_history(
                run_id, f"{site}.secagg_compute_seconds"
            )
            assert [point.step for point in sent] == [1, 2], site
            # Four sites' keys and shares are a few kilobytes of JSON.
            assert all(1000 < point.value < 100_000 for point in sent), site
            assert [point.value for point in total] == [
                e.value + s.value for e, s in zip(envelope, sent, strict=True)
            ], site
            assert all(
                0 < c.value <= w.value for c, w in zip(compute, wall, strict=True)
            ), site
            received = client.get_metric_history(
                run_id, f"{site}.secagg_message_bytes_received"
            )
            assert all(point.value > 0 for point in received), site

    # Masked int8 levels fill 32-bit ring words, like fixed point, so the
    # envelopes differ only in their headers' codec parameters.
    masked_bytes = client.get_run(masked["mlflow_run_id"]).data.metrics
    int8_bytes = client.get_run(int8["mlflow_run_id"]).data.metrics
    assert (
        abs(
            masked_bytes["cleveland.bytes_uploaded"]
            - int8_bytes["cleveland.bytes_uploaded"]
        )
        < 64
    )


def secret_windows(secret: bytes) -> list[bytes]:
    return [secret[offset : offset + 32] for offset in range(256, len(secret), 997)]


@pytest.mark.slow
def test_ckks_study_matches_plain(tmp_path: Path, mlflow_uri: str) -> None:
    # Both studies share one name because the sites' training seeds derive
    # from it; the configs differ only in secure_aggregation.
    plain_config, plain_text = short_config("heart_disease_nodp.yaml", "e2e-ckks")
    ckks_config, ckks_text = short_config("heart_disease_ckks.yaml", "e2e-ckks")

    plain = run_study(plain_config, plain_text, work_dir=tmp_path / "plain")
    encrypted = run_study(ckks_config, ckks_text, work_dir=tmp_path / "ckks")

    assert encrypted["rounds"] == plain["rounds"] == 2
    assert (
        abs(encrypted["pooled_test_accuracy"] - plain["pooled_test_accuracy"]) <= 0.01
    )
    # Training without DP is seeded, so the models differ only by the release
    # rounding and the CKKS error of each round's mean, below 1e-5.
    inputs = np.random.default_rng(0).normal(size=(50, 15)).tolist()
    plain_scores = mlflow.pyfunc.load_model(
        f"models:/e2e-ckks/{plain['registered_model_version']}"
    ).predict(inputs)
    ckks_scores = mlflow.pyfunc.load_model(
        f"models:/e2e-ckks/{encrypted['registered_model_version']}"
    ).predict(inputs)
    assert np.max(np.abs(ckks_scores - plain_scores)) < 1e-4

    site_dirs = sorted((tmp_path / "ckks" / "sites").iterdir())
    secret_files = [
        site / "studies" / "e2e-ckks" / "ckks-secret-context.bin" for site in site_dirs
    ]
    assert len(secret_files) == 4
    assert len({path.read_bytes() for path in secret_files}) == 1
    assert {path.stat().st_mode & 0o777 for path in secret_files} == {0o600}
    windows = secret_windows(secret_files[0].read_bytes())
    service_files = b"".join(
        path.read_bytes()
        for path in (tmp_path / "ckks" / "aggregation").rglob("*")
        if path.is_file()
    )
    tracking = Path(mlflow_uri.removeprefix("sqlite:///")).read_bytes()
    assert len(windows) > 300
    assert [window for window in windows if window in service_files] == []
    assert [window for window in windows if window in tracking] == []


class Interrupt(Exception):
    """Stands in for a coordinator crash between two rounds."""


def interrupt_after(last_round: int):  # type: ignore[no-untyped-def]
    def listener(round_number: int, _: dict[str, Any]) -> None:
        if round_number == last_round:
            raise Interrupt(f"stopped after round {round_number}")

    return listener


def give_same_noise_keys(config: StudyConfig, *work_dirs: Path) -> None:
    """Write one DP noise key per site into each work folder.

    Each site otherwise draws its own secret key, so two DP runs in two
    folders would draw different noise.
    """
    from medfed.sites.runner import NOISE_KEY_BYTES, NOISE_KEY_FILE

    for index, site in enumerate(config.sites):
        key = bytes([index + 1]) * NOISE_KEY_BYTES
        for work_dir in work_dirs:
            folder = work_dir / "sites" / site.id / "studies" / config.study
            folder.mkdir(parents=True, exist_ok=True)
            (folder / NOISE_KEY_FILE).write_bytes(key)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    config, text = short_config("heart_disease.yaml", "e2e-resume", rounds=3)
    give_same_noise_keys(config, tmp_path / "reference", tmp_path / "resumed")
    reference = run_study(config, text, work_dir=tmp_path / "reference")

    with pytest.raises(Interrupt):
        run_study(
            config, text, work_dir=tmp_path / "resumed", listener=interrupt_after(0)
        )
    # Round 1 is open and one site has uploaded when the coordinator returns.
    from medfed.flows.local import LocalAggregationService
    from medfed.sites.client import AggregationClient
    from medfed.sites.runner import SiteRunner

    with (
        LocalAggregationService(
            tmp_path / "resumed" / "aggregation", max_upload_bytes=10**7
        ) as service,
        AggregationClient(service.url) as client,
    ):
        client.open_round(
            "e2e-resume",
            1,
            sites=[s.id for s in config.sites],
            quorum=3,
            deadline_seconds=300,
        )
        SiteRunner(
            config, "cleveland", tmp_path / "resumed" / "sites" / "cleveland"
        ).train_round(client, 1)

    with pytest.raises(Exception, match="pass --resume to continue it"):
        run_study(config, text, work_dir=tmp_path / "resumed")
    resumed = run_study(config, text, work_dir=tmp_path / "resumed", resume=True)

    assert resumed["rounds"] == 3
    assert resumed["model_sha256"] == reference["model_sha256"]
    assert resumed["mlflow_run_id"] != reference["mlflow_run_id"]
    ledger = json.loads(
        (
            tmp_path
            / "resumed"
            / "sites"
            / "cleveland"
            / "studies"
            / "e2e-resume"
            / "privacy-ledger.json"
        ).read_text()
    )
    assert ledger["rounds_spent"] == [0, 1, 2]
    history = MlflowClient().get_metric_history(
        resumed["mlflow_run_id"], "pooled.test_accuracy"
    )
    assert sorted(point.step for point in history) == [1, 2, 3]
    tags = MlflowClient().get_run(resumed["mlflow_run_id"]).data.tags
    assert tags["medfed.event.resume1"] == "resumed at round 1 of 3"
    assert "medfed.event.resume2" not in tags


def test_resume_reports_epsilon_of_skipped_round(tmp_path: Path) -> None:
    from medfed.flows.local import LocalAggregationService
    from medfed.sites.client import AggregationClient
    from medfed.sites.privacy import PrivacyLedger
    from medfed.sites.runner import SiteRunner

    study = "e2e-resume-epsilon"
    config, text = short_config("heart_disease.yaml", study, rounds=2)
    work_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_study(config, text, work_dir=work_dir, listener=interrupt_after(0))
    # Before the stop, Cleveland uploaded to the last round, so the resumed
    # run skips it there and receives no report of that round from it.
    with (
        LocalAggregationService(
            work_dir / "aggregation", max_upload_bytes=10**7
        ) as service,
        AggregationClient(service.url) as client,
    ):
        client.open_round(
            study, 1, sites=[s.id for s in config.sites], quorum=3, deadline_seconds=300
        )
        SiteRunner(config, "cleveland", work_dir / "sites" / "cleveland").train_round(
            client, 1
        )

    resumed = run_study(config, text, work_dir=work_dir, resume=True)

    ledger = PrivacyLedger.load(
        work_dir / "sites" / "cleveland" / "studies" / study / "privacy-ledger.json"
    )
    assert ledger.rounds_spent == [0, 1]
    spent = resumed["sites"]["cleveland"]["epsilon_spent"]
    assert spent == pytest.approx(ledger.epsilon_spent(), rel=1e-12)
    version = MlflowClient().get_model_version(
        study, resumed["registered_model_version"]
    )
    tagged = float(version.tags["medfed.dp.cleveland.epsilon_spent"])
    assert tagged == pytest.approx(ledger.epsilon_spent(), rel=1e-12)


def service_version(aggregation_dir: Path, study: str) -> int | None:
    """Return the study's latest version in a stored service, None if absent."""
    from medfed.errors import ServiceError
    from medfed.flows.local import LocalAggregationService
    from medfed.sites.client import AggregationClient

    with (
        LocalAggregationService(aggregation_dir, max_upload_bytes=10**7) as service,
        AggregationClient(service.url) as client,
    ):
        try:
            return int(client.study_status(study)["latest_version"])
        except ServiceError as error:
            if error.status_code == 404:
                return None
            raise


def interrupted_study(
    tmp_path: Path, study: str, rounds: int
) -> tuple[StudyConfig, str, Path]:
    """Run a heart-disease DP study and interrupt it after round 0."""
    config, text = short_config("heart_disease.yaml", study, rounds=rounds)
    work_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_study(config, text, work_dir=work_dir, listener=interrupt_after(0))
    return config, text, work_dir


def test_resume_on_restored_service_rejected(tmp_path: Path) -> None:
    # The service and ledgers go back to a copy taken after round 0, but MLflow
    # recorded round 1, which a resume would release again uncounted.
    from medfed.errors import StateRollbackError

    study = "e2e-rollback"
    config, text, work_dir = interrupted_study(tmp_path, study, rounds=3)
    backup = tmp_path / "backup"
    for part in ("aggregation", "sites"):
        shutil.copytree(work_dir / part, backup / part)
    with pytest.raises(Interrupt):
        run_study(
            config,
            text,
            work_dir=work_dir,
            resume=True,
            listener=interrupt_after(1),
        )
    for part in ("aggregation", "sites"):
        shutil.rmtree(work_dir / part)
        shutil.copytree(backup / part, work_dir / part)
    ledger_path = work_dir / "sites" / "cleveland" / "studies" / study
    ledger_before = (ledger_path / "privacy-ledger.json").read_bytes()

    with pytest.raises(StateRollbackError) as raised:
        run_study(config, text, work_dir=work_dir, resume=True)

    message = str(raised.value)
    assert "has version 1 of study 'e2e-rollback'" in message
    assert "recorded version 2" in message
    assert "Restore the service's latest state directory" in message
    assert service_version(work_dir / "aggregation", study) == 1
    assert (ledger_path / "privacy-ledger.json").read_bytes() == ledger_before


def test_resume_on_empty_service_rejected(tmp_path: Path) -> None:
    from medfed.errors import StateRollbackError

    study = "e2e-rollback-empty"
    config, text, work_dir = interrupted_study(tmp_path, study, rounds=2)
    shutil.rmtree(work_dir / "aggregation")
    shutil.rmtree(work_dir / "sites")

    with pytest.raises(StateRollbackError, match="has version 0 of study"):
        run_study(config, text, work_dir=work_dir, resume=True)

    # The check runs before the sites prepare and the study is created again.
    assert not (work_dir / "sites").exists()
    assert service_version(work_dir / "aggregation", study) is None


def test_resume_of_deleted_mlflow_run_rejected(tmp_path: Path) -> None:
    from medfed.errors import ConfigError

    study = "e2e-deleted-run"
    config, text, work_dir = interrupted_study(tmp_path, study, rounds=2)
    run_id = json.loads((work_dir / "coordinator.json").read_text())["mlflow_run_id"]
    MlflowClient().delete_run(run_id)

    with pytest.raises(ConfigError) as raised:
        run_study(config, text, work_dir=work_dir, resume=True)

    assert f"MLflow run {run_id} of study 'e2e-deleted-run' is deleted" in str(
        raised.value
    )
    assert f"mlflow runs restore --run-id {run_id}" in str(raised.value)
    assert service_version(work_dir / "aggregation", study) == 1


def test_resume_finishing_no_round_fails(tmp_path: Path) -> None:
    # The sites lose their folders after round 0, so each finds an upload that
    # its ledger does not charge and stops: the resume adds no round and fails.
    study = "e2e-resume-no-round"
    config, text, work_dir = interrupted_study(tmp_path, study, rounds=3)
    shutil.rmtree(work_dir / "sites")

    with pytest.raises(QuorumError) as raised:
        run_study(config, text, work_dir=work_dir, resume=True)

    message = str(raised.value)
    assert message.startswith(
        "study 'e2e-resume-no-round' finished no round since the resume at round 1; "
    )
    assert "site cleveland failed: privacy ledger" in message
    assert "but the aggregation service accepted one from this site" in message
    assert service_version(work_dir / "aggregation", study) == 1
