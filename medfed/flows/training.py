"""The ``federated_training`` Prefect flow: rounds of site training and aggregation.

Per round the flow opens the round on the aggregation service, runs every
site's round as one Prefect task named after the site, asks the service to
finalize (naming the sites that rejected the round or failed), runs each
site's evaluation of the new global model, pools the aggregates and logs the
round to MLflow. In local mode the site tasks run in this process, each with
its own state folder; only the task launcher differs from a deployment.
"""

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from safetensors.numpy import load as load_safetensors

from medfed.contract.config import StudyConfig
from medfed.contract.metrics import EvaluationAggregates, pool
from medfed.errors import AggregationError, QuorumError
from medfed.flows.tracking import StudyTracker
from medfed.sites.client import AggregationClient
from medfed.sites.runner import (
    SiteRunner,
    initial_model_weights,
    weights_to_safetensors,
)

__all__ = ["RoundListener", "federated_training", "run_study"]

logger = logging.getLogger(__name__)

RoundListener = Callable[[int, dict[str, Any]], None]
"""Called after each round with the round number and its summary."""

_listeners: list[RoundListener] = []


@task(
    name="site_round",
    task_run_name="{site_id}: train round {round_number}",
    cache_policy=NONE,
    persist_result=False,
)
def site_round(
    config: StudyConfig,
    site_id: str,
    round_number: int,
    aggregation_url: str,
    state_dir: str,
) -> dict[str, Any]:
    """Run one site's local training for a round and upload its update."""
    runner = SiteRunner(config, site_id, Path(state_dir))
    with AggregationClient(aggregation_url) as client:
        return runner.train_round(client, round_number).to_dict()


@task(
    name="site_evaluation",
    task_run_name="{site_id}: evaluate model {version}",
    cache_policy=NONE,
    persist_result=False,
)
def site_evaluation(
    config: StudyConfig,
    site_id: str,
    version: int,
    aggregation_url: str,
    state_dir: str,
) -> dict[str, Any]:
    """Evaluate a global model version on one site's test split."""
    runner = SiteRunner(config, site_id, Path(state_dir))
    with AggregationClient(aggregation_url) as client:
        return vars(runner.evaluate(client, version))


@task(
    name="site_prepare",
    task_run_name="{site_id}: prepare data",
    cache_policy=NONE,
    persist_result=False,
)
def site_prepare(config: StudyConfig, site_id: str, state_dir: str) -> dict[str, Any]:
    """Preprocess a site's data and calibrate its DP noise.

    Returns the site's training record count, dataset fingerprint and DP
    parameters: nothing about any single record.
    """
    runner = SiteRunner(config, site_id, Path(state_dir))
    manifest = runner.prepare()
    records = manifest["splits"]["train"]["rows"]
    ledger = runner.ledger(records)
    privacy = {}
    if ledger is not None:
        privacy = {
            "target_epsilon": ledger.epsilon_budget,
            "delta": ledger.delta,
            "noise_multiplier": ledger.noise_multiplier,
            "max_grad_norm": ledger.max_grad_norm,
            "sample_rate": ledger.sample_rate,
        }
    return {
        "train_records": records,
        "fingerprint": runner.dataset_fingerprint(),
        "privacy": privacy,
    }


_SITE_TASK_RUNNER: Any = ThreadPoolTaskRunner(max_workers=8)


@flow(name="federated_training", task_runner=_SITE_TASK_RUNNER, log_prints=False)
def federated_training(
    config: StudyConfig, config_text: str, work_dir: str, aggregation_url: str
) -> dict[str, Any]:
    """Train the study's model across its sites; return the study summary."""
    started = time.monotonic()
    sites = [site.id for site in config.sites]
    site_dirs = {site: str(Path(work_dir) / "sites" / site) for site in sites}
    client = AggregationClient(aggregation_url)
    tracker = StudyTracker(config, config_text)
    try:
        summary = _train(config, client, tracker, sites, site_dirs, aggregation_url)
    except BaseException:
        tracker.finish(status="FAILED")
        raise
    finally:
        client.close()
    summary["wall_seconds"] = time.monotonic() - started
    summary["mlflow_run_id"] = tracker.run_id
    tracker.finish()
    return summary


def _train(
    config: StudyConfig,
    client: AggregationClient,
    tracker: StudyTracker,
    sites: list[str],
    site_dirs: dict[str, str],
    aggregation_url: str,
) -> dict[str, Any]:
    prepared = _gather(
        {site: site_prepare.submit(config, site, site_dirs[site]) for site in sites}
    )
    failed_prepare = {
        site: str(error)
        for site, error in prepared.items()
        if isinstance(error, BaseException)
    }
    if failed_prepare:
        raise AggregationError(
            "sites could not prepare their data: "
            + "; ".join(
                f"{site}: {message}" for site, message in failed_prepare.items()
            )
        )

    tracker.log_params({site: info["privacy"] for site, info in prepared.items()})
    initial = weights_to_safetensors(
        initial_model_weights(config),
        metadata={"medfed_study_settings": json.dumps({
            "sites": sites, "strategy": config.strategy.name, "strategy_params": config.strategy.params,
        })},
    )  # fmt: skip
    client.create_study(config.study, initial)

    last_reports: dict[str, dict[str, Any]] = {}
    evaluations: dict[str, EvaluationAggregates] = {}
    refusals: list[dict[str, Any]] = []
    completed_rounds = 0
    version = 0
    round_seconds: list[float] = []
    for round_number in range(config.training.rounds):
        round_started = time.monotonic()
        client.open_round(
            config.study,
            round_number,
            sites=sites,
            quorum=config.quorum,
            deadline_seconds=config.round.deadline_seconds,
        )
        futures = {
            site: site_round.submit(
                config, site, round_number, aggregation_url, site_dirs[site]
            )
            for site in sites
        }
        outcomes = _gather(futures)
        reports, absent = {}, []
        for site, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                logger.warning(
                    "site %s failed in round %d: %s", site, round_number, outcome
                )
                absent.append(site)
            elif outcome["status"] != "uploaded":
                refusals.append(
                    {"round": round_number, "site": site, "message": outcome["message"]}
                )
                tracker.log_event(
                    f"refusal.{site}.round{round_number}", outcome["message"]
                )
                absent.append(site)
                last_reports[site] = outcome
            else:
                reports[site] = outcome
                last_reports[site] = outcome

        status = client.finalize(config.study, round_number, absent=absent)
        if status["state"] != "finalized":
            tracker.log_event(
                f"abort.round{round_number}", status["reason"] or "aborted"
            )
            if not reports:
                logger.warning(
                    "stopping study %s: no site uploaded in round %d",
                    config.study,
                    round_number,
                )
                break
            continue
        version = status["result_version"]
        completed_rounds += 1

        evaluated = _gather({
            site: site_evaluation.submit(config, site, version, aggregation_url, site_dirs[site])
            for site in sites
        })  # fmt: skip
        evaluations = {
            site: EvaluationAggregates(**result)
            for site, result in evaluated.items()
            if not isinstance(result, BaseException)
        }
        pooled = pool(list(evaluations.values()))
        tracker.log_round(version, evaluations, pooled, reports)
        round_seconds.append(time.monotonic() - round_started)
        round_summary = {
            "round": round_number,
            "version": version,
            "pooled_test_accuracy": pooled.accuracy,
            "pooled_test_auc": pooled.auc,
            "uploaded": sorted(reports),
            "absent": sorted(absent),
        }
        for listener in list(_listeners):
            listener(round_number, round_summary)

    if completed_rounds == 0:
        raise QuorumError(
            f"study {config.study!r} finished no round; "
            + (
                "; ".join(r["message"] for r in refusals[-len(sites) :])
                or "see the aggregation service log"
            )
        )

    final = client.download_model(config.study, version)
    lineage = _lineage(config, prepared, last_reports)
    registered = tracker.register_model(
        load_safetensors(weights_to_safetensors(final.weights)),
        version=version,
        round_number=completed_rounds - 1,
        sites=sites,
        lineage={**lineage, "medfed.model_sha256": final.sha256},
    )
    pooled = pool(list(evaluations.values()))
    return {
        "study": config.study,
        "rounds": completed_rounds,
        "model_version": version,
        "model_sha256": final.sha256,
        "registered_model_version": registered,
        "pooled_test_accuracy": pooled.accuracy,
        "pooled_test_auc": pooled.auc,
        "refusals": refusals,
        "round_seconds": round_seconds,
        "sites": {
            site: {
                "test_accuracy": evaluations[site].accuracy
                if site in evaluations
                else None,
                "test_auc": evaluations[site].auc if site in evaluations else None,
                "test_records": evaluations[site].records
                if site in evaluations
                else None,
                "epsilon_spent": last_reports.get(site, {}).get("epsilon_spent"),
                "train_records": prepared[site]["train_records"],
            }
            for site in sites
        },
    }


def _lineage(
    config: StudyConfig, prepared: dict[str, Any], reports: dict[str, dict[str, Any]]
) -> dict[str, str]:
    tags = {
        "medfed.dp_enabled": str(config.privacy.enabled),
        "medfed.dp_accountant": config.privacy.accountant,
        "medfed.dp_max_grad_norm": str(config.privacy.max_grad_norm),
    }
    for site, info in prepared.items():
        tags[f"medfed.dataset_fingerprint.{site}"] = info["fingerprint"]
        report = reports.get(site, {})
        if config.privacy.enabled:
            epsilon, delta = config.site_budget(site)
            tags[f"medfed.dp.{site}.target_epsilon"] = str(epsilon)
            tags[f"medfed.dp.{site}.delta"] = str(delta)
            tags[f"medfed.dp.{site}.noise_multiplier"] = str(
                report.get("noise_multiplier")
            )
            tags[f"medfed.dp.{site}.epsilon_spent"] = str(report.get("epsilon_spent"))
    return tags


def _gather(futures: dict[str, PrefectFuture[Any]]) -> dict[str, Any]:
    """Wait for every future; map each site to its result or its exception."""
    results: dict[str, Any] = {}
    for site, future in futures.items():
        try:
            results[site] = future.result()
        except Exception as error:  # a failed site must not stop the others
            results[site] = error
    return results


def run_study(
    config: StudyConfig,
    config_text: str,
    *,
    work_dir: Path,
    listener: RoundListener | None = None,
) -> dict[str, Any]:
    """Run a study in local mode: start the service, run the flow, stop the service."""
    from medfed.flows.local import LocalAggregationService

    # Local mode trains every site at once in this process, so each site gets
    # an equal share of the cores instead of every torch op spawning threads
    # that contend for all of them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(config.sites)))
    if listener is not None:
        _listeners.append(listener)
    try:
        if config.aggregation.url:
            return federated_training(
                config, config_text, str(work_dir), config.aggregation.url
            )
        with LocalAggregationService(
            work_dir / "aggregation",
            max_upload_bytes=config.aggregation.max_upload_bytes,
        ) as service:
            return federated_training(config, config_text, str(work_dir), service.url)
    finally:
        if listener is not None:
            _listeners.remove(listener)
