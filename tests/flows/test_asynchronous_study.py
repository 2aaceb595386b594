"""Asynchronous studies through the real flow, service and MLflow.

One site is made slow on purpose: the test patches its ``_training_settings``
step, which runs after the site downloaded the latest version and before it
trains, to wait until the service has published two more versions. Its
updates therefore arrive stale, and the other sites publish versions without
waiting for it. So that the slow site's updates land at all on a loaded
machine, the other sites start training only once it has started, and hold
the study's last version until its first update has arrived.
"""

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from medfed.contract.config import StudyConfig, parse_study_config
from medfed.errors import MedfedError, StateRollbackError
from medfed.flows.local import LocalAggregationService
from medfed.flows.training import run_study
from medfed.sites import runner as runner_module
from medfed.sites.client import AggregationClient
from medfed.sites.privacy import PrivacyLedger
from medfed.sites.runner import (
    SiteRunner,
    initial_model_weights,
    weights_to_safetensors,
)
from tests.conftest import CONFIGS

SLOW_SITE = "switzerland"
ROUNDS = 6


def async_config(
    study: str, url: str | None = None, rounds: int = ROUNDS, **asynchronous: Any
) -> tuple[StudyConfig, str]:
    raw: dict[str, Any] = yaml.safe_load((CONFIGS / "heart_disease.yaml").read_text())
    raw["study"] = study
    raw["training"]["rounds"] = rounds
    raw["training"]["local_epochs"] = 1
    raw["round"] = {
        "deadline_seconds": 120,
        "asynchronous": {"buffer_size": 2, **asynchronous},
    }
    if url is not None:
        raw["aggregation"] = {"url": url}
    return parse_study_config(raw), yaml.safe_dump(raw)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[LocalAggregationService]:
    with LocalAggregationService(
        tmp_path / "aggregation", max_upload_bytes=1_000_000
    ) as running:
        yield running


def asynchronous_status(url: str, study: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/studies/{study}/asynchronous", timeout=10)
    status: dict[str, Any] = response.json()
    return status


def wait_for_versions(url: str, study: str, count: int) -> None:
    """Wait until ``count`` more versions are published or the study finished."""
    target = asynchronous_status(url, study)["latest_version"] + count
    waited_until = time.monotonic() + 60
    while time.monotonic() < waited_until:
        status = asynchronous_status(url, study)
        if status["latest_version"] >= target or status["finished"]:
            return
        time.sleep(0.05)


def ledger_of(work_dir: Path, site: str, study: str) -> PrivacyLedger:
    return PrivacyLedger.load(
        work_dir / "sites" / site / "studies" / study / "privacy-ledger.json"
    )


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_slow_site_does_not_hold_versions(
    tmp_path: Path, service: LocalAggregationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = "async-slow-site"
    config, text = async_config(study, service.url)
    original = SiteRunner._training_settings

    slow_started = threading.Event()

    def wait_for(condition: Callable[[dict[str, Any]], bool]) -> None:
        waited_until = time.monotonic() + 60
        while time.monotonic() < waited_until:
            status = asynchronous_status(service.url, study)
            if condition(status) or status["finished"]:
                return
            time.sleep(0.05)

    def slow_settings(self: SiteRunner, *args: Any, **kwargs: Any) -> Any:
        if self.site_id == SLOW_SITE:
            slow_started.set()
            target = asynchronous_status(service.url, study)["latest_version"] + 2
            wait_for(lambda status: status["latest_version"] >= target)
        else:
            # On a loaded machine the fast sites could otherwise publish every
            # version before the slow site starts or before its update lands.
            slow_started.wait(timeout=60)
            wait_for(
                lambda status: (
                    status["latest_version"] < ROUNDS - 1
                    or any(item["site"] == SLOW_SITE for item in status["arrivals"])
                )
            )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SiteRunner, "_training_settings", slow_settings)

    summary = run_study(config, text, work_dir=tmp_path / "run")

    sites = summary["sites"]
    slow = sites[SLOW_SITE]
    fast = {site: entry for site, entry in sites.items() if site != SLOW_SITE}
    assert summary["rounds"] == ROUNDS
    assert summary["asynchronous"]["versions"] == ROUNDS
    assert len(summary["asynchronous"]["version_seconds"]) == ROUNDS
    assert summary["asynchronous"]["failures"] == []
    assert slow["updates"] >= 1
    assert all(staleness >= 2 for staleness in slow["staleness"])
    for site, entry in fast.items():
        assert entry["updates"] > slow["updates"], site
        assert entry["updates"] <= ROUNDS, site
    assert sum(entry["aggregated_updates"] for entry in sites.values()) == 2 * ROUNDS
    assert 0.0 <= summary["pooled_test_accuracy"] <= 1.0
    for site, entry in sites.items():
        ledger = PrivacyLedger.load(
            tmp_path
            / "run"
            / "sites"
            / site
            / "studies"
            / study
            / "privacy-ledger.json"
        )
        assert len(ledger.rounds_spent) <= ROUNDS, site
        assert entry["epsilon_spent"] <= 1.0, site

    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["round_mode"] == "asynchronous"
    assert run.data.params["asynchronous_buffer_size"] == "2"
    assert run.data.params["asynchronous_staleness_exponent"] == "0.5"
    assert "round_quorum" not in run.data.params
    metrics = run.data.metrics
    assert metrics[f"{SLOW_SITE}.asynchronous_updates"] == slow["updates"]
    assert metrics[f"{SLOW_SITE}.max_staleness"] >= 2
    assert metrics["pooled.test_accuracy"] == pytest.approx(
        summary["pooled_test_accuracy"]
    )
    assert run.info.status == "FINISHED"
    assert summary["registered_model_version"] is not None


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_stale_site_keeps_training(
    tmp_path: Path, service: LocalAggregationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = "async-stale-site"
    # Enough versions that the study is still running when the slow site's
    # first update comes back rejected.
    rounds = 12
    config, text = async_config(study, service.url, rounds, max_staleness=0)
    original = SiteRunner._training_settings

    def slow_first_update(
        self: SiteRunner, ledger: Any, update_number: int, *args: Any
    ) -> Any:
        if self.site_id == SLOW_SITE and update_number == 0:
            wait_for_versions(service.url, study, 1)
        return original(self, ledger, update_number, *args)

    monkeypatch.setattr(SiteRunner, "_training_settings", slow_first_update)

    summary = run_study(config, text, work_dir=tmp_path / "run")

    asynchronous = summary["asynchronous"]
    assert asynchronous["failures"] == []
    stale = asynchronous["stale_rejections"]
    # With max_staleness 0 a fast site's update may be rejected too.
    slow_first = [e for e in stale if e["site"] == SLOW_SITE and e["update"] == 0]
    assert len(slow_first) == 1
    assert "more than max_staleness 0" in slow_first[0]["message"]
    assert summary["rounds"] == rounds
    # The site trained again after its first update was rejected.
    ledger = ledger_of(tmp_path / "run", SLOW_SITE, study)
    assert ledger.rounds_spent[:2] == [0, 1]
    assert summary["sites"][SLOW_SITE]["epsilon_spent"] is not None
    events = mlflow.get_run(summary["mlflow_run_id"]).data.tags
    assert f"medfed.event.stale.{SLOW_SITE}.update0" in events


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_resume_of_finished_async_study_rejected(tmp_path: Path) -> None:
    study = "async-finished-resume"
    config, text = async_config(study, rounds=2)
    first = run_study(config, text, work_dir=tmp_path / "run")

    with pytest.raises(MedfedError) as raised:
        run_study(config, text, work_dir=tmp_path / "run", resume=True)

    assert "already published all 2 versions" in str(raised.value)
    assert "nothing to resume" in str(raised.value)
    versions = MlflowClient().search_model_versions(f"name = '{study}'")
    assert [int(version.version) for version in versions] == [
        int(first["registered_model_version"])
    ]


def test_retrained_update_gets_new_noise(
    tmp_path: Path, service: LocalAggregationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site that trains an update number again, on a newer version, gets new noise.

    A resumed study counts a site's updates from those the service accepted,
    so an update that reached the service unaccepted is trained again under
    the same number. Reusing its seed would reuse its DP noise on other
    gradients, and the two uploads together would cancel the noise.
    """
    config, _ = async_config("async-seed", service.url, buffer_size=1)
    settings = {
        "sites": [site.id for site in config.sites],
        "strategy": "fedavg",
        "asynchronous": {"buffer_size": 1, "max_versions": ROUNDS},
    }
    seeds: list[int] = []
    original = runner_module.train_locally

    def recording(*args: Any, seed: int, **kwargs: Any) -> Any:
        seeds.append(seed)
        return original(*args, seed=seed, **kwargs)

    monkeypatch.setattr(runner_module, "train_locally", recording)
    runner = SiteRunner(config, "cleveland", tmp_path / "cleveland")

    with AggregationClient(service.url) as client:
        client.create_study(
            config.study,
            weights_to_safetensors(
                initial_model_weights(config),
                metadata={"medfed_study_settings": json.dumps(settings)},
            ),
        )
        first = runner.train_asynchronous(client, 0)
        again = runner.train_asynchronous(client, 0)

    assert first.status == "uploaded"
    assert again.status == "uploaded"
    assert len(seeds) == 2
    assert seeds[0] != seeds[1]


def test_privacy_spent_audited_before_upload(
    tmp_path: Path, service: LocalAggregationService
) -> None:
    """A site reports an update's privacy spend before it uploads the update.

    Otherwise a crash between the service's acceptance and the report leaves
    an accepted update without its spend in the audit log.
    """
    config, _ = async_config("async-spent-order", service.url, buffer_size=1)
    settings = {
        "sites": [site.id for site in config.sites],
        "strategy": "fedavg",
        "asynchronous": {"buffer_size": 1, "max_versions": ROUNDS},
    }
    runner = SiteRunner(config, "cleveland", tmp_path / "cleveland")

    with AggregationClient(service.url) as client:
        client.create_study(
            config.study,
            weights_to_safetensors(
                initial_model_weights(config),
                metadata={"medfed_study_settings": json.dumps(settings)},
            ),
        )
        report = runner.train_asynchronous(client, 0)

    log = tmp_path / "aggregation" / "audit.jsonl"
    events = [
        entry["event"]
        for entry in map(json.loads, log.read_text().splitlines())
        if entry["actor"] == "cleveland"
        and entry["event"] in ("privacy.spent", "update.accepted")
    ]
    assert report.status == "uploaded"
    assert events == ["privacy.spent", "update.accepted"]


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_listener_called_per_version(tmp_path: Path) -> None:
    config, text = async_config("async-listener", rounds=3)
    calls: list[tuple[int, dict[str, Any]]] = []

    run_study(
        config,
        text,
        work_dir=tmp_path / "run",
        listener=lambda number, summary: calls.append((number, summary)),
    )

    assert [number for number, _ in calls] == [0, 1, 2]
    assert [summary["version"] for _, summary in calls] == [1, 2, 3]


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_update_running_at_finish_reported(
    tmp_path: Path, service: LocalAggregationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update still training when the last version is published is waited for.

    Its privacy cost is in the site's ledger, so the summary's epsilon spent
    must include it.
    """
    study = "async-late-update"
    config, text = async_config(study, service.url, rounds=2)
    original = SiteRunner._training_settings

    def train_after_finish(self: SiteRunner, *args: Any, **kwargs: Any) -> Any:
        if self.site_id == SLOW_SITE:
            waited_until = time.monotonic() + 60
            while not asynchronous_status(service.url, study)["finished"]:
                assert time.monotonic() < waited_until
                time.sleep(0.05)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SiteRunner, "_training_settings", train_after_finish)

    summary = run_study(config, text, work_dir=tmp_path / "run")

    ledger = ledger_of(tmp_path / "run", SLOW_SITE, study)
    slow = summary["sites"][SLOW_SITE]
    assert ledger.rounds_spent == [0]
    assert slow["updates"] == 0
    assert slow["epsilon_spent"] == pytest.approx(ledger.epsilon_spent())
    assert summary["asynchronous"]["failures"] == []


class StopStudy(Exception):
    """Raised by a listener to stop a study in the middle."""


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_resume_recorded_in_mlflow(tmp_path: Path) -> None:
    study = "async-resume-record"
    rounds = 8
    config, text = async_config(study, rounds=rounds)

    def stop_at_version_two(number: int, summary: dict[str, Any]) -> None:
        if summary["version"] == 2:
            raise StopStudy("stopped at version 2")

    with pytest.raises(StopStudy):
        run_study(config, text, work_dir=tmp_path / "run", listener=stop_at_version_two)
    summary = run_study(config, text, work_dir=tmp_path / "run", resume=True)

    # The updates still running at the stop may have published more versions.
    resumed_at = rounds - len(summary["asynchronous"]["version_seconds"])
    assert 2 <= resumed_at < rounds
    assert summary["rounds"] == rounds
    client = MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["medfed.event.resume1"] == (
        f"resumed at version {resumed_at} of {rounds}"
    )
    history = client.get_metric_history(run.info.run_id, "asynchronous.version_seconds")
    steps = sorted(metric.step for metric in history)
    assert steps == list(range(resumed_at + 1, rounds + 1))
    versions = client.search_model_versions(f"name = '{study}'")
    assert [str(version.version) for version in versions] == [
        summary["registered_model_version"]
    ]


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_resume_on_emptied_service_rejected(tmp_path: Path) -> None:
    # Each published version is in MLflow as the study runs, so a resume
    # after the service lost its state stops before training again.
    study = "async-rollback"
    config, text = async_config(study, rounds=6)
    work_dir = tmp_path / "run"

    def stop_at_version_two(number: int, summary: dict[str, Any]) -> None:
        if summary["version"] == 2:
            raise StopStudy("stopped at version 2")

    with pytest.raises(StopStudy):
        run_study(config, text, work_dir=work_dir, listener=stop_at_version_two)
    state = json.loads((work_dir / "coordinator.json").read_text())
    history = MlflowClient().get_metric_history(
        state["mlflow_run_id"], "asynchronous.published_version"
    )
    assert sorted(metric.step for metric in history)[:2] == [1, 2]
    shutil.rmtree(work_dir / "aggregation")

    with pytest.raises(StateRollbackError, match="has version 0 of study"):
        run_study(config, text, work_dir=work_dir, resume=True)
