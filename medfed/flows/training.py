"""The ``federated_training`` Prefect flow: rounds of site training and aggregation.

Per round the flow opens the round on the aggregation service, runs every
site's round as one Prefect task named after the site, requests that the
service finalize (naming the sites that rejected the round or failed), runs each
site's evaluation of the new global model, pools the aggregates and logs the
round to MLflow. In a masking round it withdraws a site from the round as
soon as the site's task fails, so the other sites need not wait for it, and
it stops waiting for sites the masking round dropped once the others have
revealed their shares. In local mode the site tasks run in this process,
each with its own state folder. In deployment mode (``deployed_sites``) the same tasks start the site
flows in each site's Prefect work pool instead (``medfed.flows.deployments``);
nothing else differs.
"""

import json
import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from safetensors.numpy import load as load_safetensors

from medfed.aggregation.selection import select_sites
from medfed.contract.config import StudyConfig
from medfed.contract.metrics import EvaluationAggregates, pool, youden_threshold
from medfed.errors import (
    AggregationError,
    ConfigError,
    MedfedError,
    QuorumError,
    ServiceError,
    SiteRunError,
    StateRollbackError,
)
from medfed.flows.async_training import (
    asynchronous_summary,
    run_asynchronous,
    site_asynchronous_update,
)
from medfed.flows.masking_watch import MaskingRoundWatch
from medfed.flows.site_round import prepare_site
from medfed.flows.tracking import StudyTracker
from medfed.sites.ckks_keys import ensure_local_secret_contexts
from medfed.sites.client import AggregationClient
from medfed.sites.runner import (
    SiteRunner,
    connect_site,
    initial_model_weights,
    weights_to_safetensors,
)

__all__ = ["RoundListener", "check_local_data", "federated_training", "run_study"]

logger = logging.getLogger(__name__)

RoundListener = Callable[[int, dict[str, Any]], None]
"""Called after each round with the round number and its summary.

In an asynchronous study it is called for each published version ``v`` with
``v - 1`` and a summary of ``round`` and ``version`` only, without metrics.
"""

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
    client, signer = connect_site(aggregation_url)
    runner = SiteRunner(config, site_id, Path(state_dir), signer=signer)
    return runner.train_round(client, round_number).to_dict()


@task(
    name="site_decrypt",
    task_run_name="{site_id}: decrypt round {round_number}",
    cache_policy=NONE,
    persist_result=False,
)
def site_decrypt(
    config: StudyConfig,
    site_id: str,
    round_number: int,
    aggregation_url: str,
    state_dir: str,
) -> dict[str, Any]:
    """Decrypt a CKKS round's encrypted sum at one site and send it to the service."""
    client, signer = connect_site(aggregation_url)
    runner = SiteRunner(config, site_id, Path(state_dir), signer=signer)
    return runner.decrypt_sum(client, round_number)


@task(
    name="site_evaluation",
    task_run_name="{site_id}: evaluate model {version} on {split}",
    cache_policy=NONE,
    persist_result=False,
)
def site_evaluation(
    config: StudyConfig,
    site_id: str,
    version: int,
    aggregation_url: str,
    state_dir: str,
    split: Literal["test", "val"] = "test",
) -> dict[str, Any]:
    """Evaluate a global model version on one of a site's splits."""
    runner = SiteRunner(config, site_id, Path(state_dir))
    client, _ = connect_site(aggregation_url)
    return vars(runner.evaluate(client, version, split))


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
    return prepare_site(SiteRunner(config, site_id, Path(state_dir)))


_SITE_TASK_RUNNER: Any = ThreadPoolTaskRunner(max_workers=8)


@flow(name="federated_training", task_runner=_SITE_TASK_RUNNER, log_prints=False)
def federated_training(
    config: StudyConfig,
    config_text: str,
    work_dir: str,
    aggregation_url: str,
    resume: bool = False,
    deployed_sites: bool = False,
    kit_dir: str | None = None,
) -> dict[str, Any]:
    """Train the study's model across its sites; return the study summary.

    With ``resume`` the flow continues the study recorded in ``work_dir``
    and on the aggregation service from its last finished round. An open
    round is completed without retraining the sites that already uploaded.
    With ``deployed_sites`` each site's work runs in its own work pool
    ``site-<id>`` (see ``medfed.flows.deployments``), and every remote run
    waits at most the round deadline. ``kit_dir`` is the coordinator's
    startup kit from ``medfed provision``; the flow then calls the
    aggregation service over mutual TLS with the kit's certificate.
    """
    coordinator = _Coordinator(
        config,
        Path(work_dir),
        aggregation_url,
        deployed_sites=deployed_sites,
        kit_dir=Path(kit_dir) if kit_dir else None,
    )
    return coordinator.run(config_text, resume=resume)


@dataclass(frozen=True)
class _RoundResult:
    """A round's new model version (None when aborted) and its site reports."""

    version: int | None
    reports: dict[str, dict[str, Any]]
    stop: bool = False


class _Coordinator:
    """The flow's state while it runs one study."""

    def __init__(
        self,
        config: StudyConfig,
        work_dir: Path,
        aggregation_url: str,
        *,
        deployed_sites: bool = False,
        kit_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.kit_dir = kit_dir
        self.prepare_task: Any = site_prepare
        self.round_task: Any = site_round
        self.evaluation_task: Any = site_evaluation
        self.decrypt_task: Any = site_decrypt
        self.asynchronous_task: Any = site_asynchronous_update
        self.deployed_sites = deployed_sites
        if deployed_sites:
            from medfed.flows import deployments

            self.prepare_task = deployments.deployed_site_prepare
            self.round_task = deployments.deployed_site_round
            self.evaluation_task = deployments.deployed_site_evaluation
            self.decrypt_task = deployments.deployed_site_decrypt
            self.asynchronous_task = deployments.deployed_site_update
        self.work_dir = work_dir
        self.aggregation_url = aggregation_url
        self.sites = [site.id for site in config.sites]
        self.site_dirs = {site: str(work_dir / "sites" / site) for site in self.sites}
        self.state_path = work_dir / "coordinator.json"
        self.last_reports: dict[str, dict[str, Any]] = {}
        self.evaluations: dict[str, EvaluationAggregates] = {}
        self.train_records: dict[str, int] = {}
        #: Per round run in this process: sites asked, sites uploaded, outcome.
        self.participants: list[dict[str, Any]] = []
        #: Bytes each site uploaded and downloaded in its accepted rounds here.
        self.traffic: dict[str, dict[str, int]] = {}
        #: Score from which a record counts as positive in reported accuracy.
        self.threshold = 0.5
        self.refusals: list[dict[str, Any]] = []
        #: Asynchronous mode: updates the service rejected as staler than
        #: max_staleness, each with its site, update number and message.
        self.stale_rejections: list[dict[str, Any]] = []
        #: Per site that raised in a round: the round and the error as one line.
        self.failures: list[dict[str, Any]] = []
        #: Per site that the flow withdrew from a masking round: the round.
        self.withdrawals: list[dict[str, Any]] = []
        #: Per site whose task still ran when its masking round could finish
        #: without it: the round and why the round dropped the site.
        self.dropped: list[dict[str, Any]] = []
        self.round_seconds: list[float] = []
        #: Asynchronous mode: seconds from the start of training to each
        #: version published in this run.
        self.version_seconds: list[float] = []
        self.last_round = -1
        #: Sites whose data preparation failed; they are absent from every
        #: round of this run.
        self.unprepared: set[str] = set()

    def run(self, config_text: str, *, resume: bool) -> dict[str, Any]:
        started = time.monotonic()
        run_id = self._previous_run_id(resume)
        tracker = StudyTracker(self.config, config_text, run_id=run_id)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(
            json.dumps({"mlflow_run_id": tracker.run_id}), encoding="utf-8"
        )
        try:
            with self._connect() as client:
                summary = self._train(client, tracker, resumed=run_id is not None)
        except BaseException:
            tracker.finish(status="FAILED")
            raise
        summary["wall_seconds"] = time.monotonic() - started
        summary["mlflow_run_id"] = tracker.run_id
        tracker.finish()
        return summary

    def _connect(self) -> AggregationClient:
        if self.kit_dir is None:
            return AggregationClient(self.aggregation_url)
        return AggregationClient.with_kit(self.aggregation_url, self.kit_dir)

    def _previous_run_id(self, resume: bool) -> str | None:
        if not self.state_path.exists():
            return None
        if not resume:
            raise ConfigError(
                f"{self.work_dir} already contains study {self.config.study!r}; pass "
                "--resume to continue it, or choose a new --work-dir"
            )
        run_id: str = json.loads(self.state_path.read_text(encoding="utf-8"))[
            "mlflow_run_id"
        ]
        return run_id

    def _train(
        self, client: AggregationClient, tracker: StudyTracker, *, resumed: bool
    ) -> dict[str, Any]:
        # Before the sites prepare: a rejected resume must not touch their state.
        if resumed:
            self._check_service_not_rolled_back(client, tracker)
        prepared = self._prepare_sites(tracker)
        self.train_records = {
            site: int(info["train_records"]) for site, info in prepared.items()
        }
        tracker.log_params({site: info["privacy"] for site, info in prepared.items()})
        if self.config.secure_aggregation.mode == "ckks" and not self.deployed_sites:
            # Deployed sites read the secret context from their startup kits.
            ensure_local_secret_contexts(
                self.config,
                [
                    SiteRunner(self.config, site, Path(self.site_dirs[site])).study_dir
                    for site in self.sites
                ],
            )
        client.create_study(self.config.study, self._initial_model())
        status = client.study_status(self.config.study)
        version: int = status["latest_version"]
        first_round, uploaded = _resume_point(status["latest_round"])
        if status["latest_round"] and status["latest_round"]["state"] == "finalized":
            self.last_round = int(status["latest_round"]["round"])
        if first_round >= self.config.training.rounds:
            raise MedfedError(
                f"study {self.config.study!r} already finished all "
                f"{self.config.training.rounds} rounds in {self.work_dir}; there is "
                "nothing to resume, so leave out --resume to start a new run"
            )
        if self.config.round.asynchronous is not None:
            if version >= self.config.training.rounds:
                raise MedfedError(
                    f"asynchronous study {self.config.study!r} already published "
                    f"all {self.config.training.rounds} versions in {self.work_dir}; "
                    "there is nothing to resume, so leave out --resume to start a "
                    "new run"
                )
            if resumed:
                tracker.log_resume(
                    f"resumed at version {version} of {self.config.training.rounds}"
                )
            return self._train_asynchronously(client, tracker, prepared)
        if resumed:
            logger.info("resuming study %s at round %d", self.config.study, first_round)
            tracker.log_resume(
                f"resumed at round {first_round} of {self.config.training.rounds}"
            )

        finished = 0
        for round_number in range(first_round, self.config.training.rounds):
            round_started = time.monotonic()
            result = self._run_round(client, tracker, round_number, skip=uploaded)
            uploaded = []
            if result.stop:
                break
            if result.version is None:
                continue
            finished += 1
            version, reports = result.version, result.reports
            self.last_round = round_number
            self._evaluate(version)
            pooled = pool(list(self.evaluations.values()))
            tracker.log_round(
                version, self.evaluations, pooled, reports, threshold=self.threshold
            )
            self.round_seconds.append(time.monotonic() - round_started)
            for listener in list(_listeners):
                listener(round_number, {
                    "round": round_number,
                    "version": version,
                    "pooled_test_accuracy": pooled.accuracy,
                    "pooled_test_auc": pooled.auc,
                    "uploaded": sorted(reports),
                })  # fmt: skip

        # A resumed run that adds no round fails like a new one: a model of the
        # earlier run, registered with exit code 0, would hide why it stopped.
        if finished == 0:
            since = f" since the resume at round {first_round}" if resumed else ""
            raise QuorumError(
                f"study {self.config.study!r} finished no round{since}; "
                + (self._last_round_reasons() or "see the aggregation service log")
            )
        return self._finish(client, tracker, prepared, version)

    def _check_service_not_rolled_back(
        self, client: AggregationClient, tracker: StudyTracker
    ) -> None:
        """Raise if the service lacks versions that the MLflow run recorded.

        Raises:
            StateRollbackError: the service's latest version of the study is
                older than the run's, or the service has no such study.
        """
        recorded = tracker.recorded_version()
        if recorded == 0:
            return
        try:
            status = client.study_status(self.config.study)
        except ServiceError as error:
            if error.status_code != 404:
                raise
            status = {"latest_version": 0}
        version = int(status["latest_version"])
        if version >= recorded:
            return
        raise StateRollbackError(
            f"the aggregation service has version {version} of study "
            f"{self.config.study!r}, but MLflow run {tracker.run_id} recorded "
            f"version {recorded}: the service's state was restored from an older "
            "backup or replaced. Restore the service's latest state directory "
            "and resume again; if it is lost, start a new study, because the "
            "sites already spent privacy on the lost versions"
        )

    def _train_asynchronously(
        self,
        client: AggregationClient,
        tracker: StudyTracker,
        prepared: dict[str, Any],
    ) -> dict[str, Any]:
        """Run the sites' asynchronous update loops, then evaluate the final version."""
        version = run_asynchronous(self, client, tracker)
        self.last_round = version
        self._evaluate(version)
        pooled = pool(list(self.evaluations.values()))
        tracker.log_round(
            version,
            self.evaluations,
            pooled,
            self.last_reports,
            threshold=self.threshold,
        )
        per_site = asynchronous_summary(client.asynchronous_status(self.config.study))
        tracker.log_asynchronous(
            per_site,
            self.version_seconds,
            first_version=version - len(self.version_seconds) + 1,
        )
        summary = self._finish(client, tracker, prepared, version)
        summary["asynchronous"] = {
            "versions": version,
            "version_seconds": self.version_seconds,
            "failures": self.failures,
            "stale_rejections": self.stale_rejections,
        }
        for site, entry in summary["sites"].items():
            entry.update(
                per_site.get(
                    site, {"updates": 0, "aggregated_updates": 0, "staleness": []}
                )
            )
        return summary

    def _last_round_reasons(self) -> str:
        """Return the reason each site of the last round did not upload, in one line."""
        if not self.participants:
            return ""
        last = self.participants[-1]["round"]
        reasons = [
            f"site {failure['site']} failed: {failure['message']}"
            for failure in self.failures
            if failure["round"] == last
        ]
        reasons += [
            refusal["message"] for refusal in self.refusals if refusal["round"] == last
        ]
        reasons += [
            f"site {dropped['site']} {dropped['message']}"
            for dropped in self.dropped
            if dropped["round"] == last
        ]
        return "; ".join(reasons)

    def _prepare_sites(self, tracker: StudyTracker) -> dict[str, Any]:
        """Prepare every site's data; return the reports of the sites that did.

        A site can fail to prepare because its container is down or its flow
        run missed the deadline or failed. While the prepared sites can still
        meet the quorum, such a site is left out of this run like a site that
        is absent from a round. A data or config error of a local site stops
        the study with that error.

        Raises:
            MedfedError: fewer sites than the quorum prepared; the message
                names every failed site and its error.
        """
        outcomes = _gather(
            {
                site: self.prepare_task.submit(self.config, site, self.site_dirs[site])
                for site in self.sites
            }
        )
        failures = {
            site: error
            for site, error in outcomes.items()
            if isinstance(error, BaseException)
        }
        prepared = {
            site: report for site, report in outcomes.items() if site not in failures
        }
        fatal = [
            error
            for error in failures.values()
            if isinstance(error, MedfedError) and not isinstance(error, SiteRunError)
        ]
        if failures and (fatal or len(prepared) < self.config.quorum):
            message = "; ".join(
                f"site {site}: {error}" for site, error in failures.items()
            )
            if not fatal:
                message = (
                    f"only {len(prepared)} of {len(self.sites)} sites prepared "
                    f"their data, fewer than the quorum of {self.config.quorum}: "
                    + message
                )
            first = fatal[0] if fatal else next(iter(failures.values()))
            # Keep the sites' own error type (a data or config error) so the
            # CLI reports it with its exit code.
            if isinstance(first, MedfedError):
                raise type(first)(message)
            raise AggregationError(f"sites could not prepare their data: {message}")
        for site, error in failures.items():
            logger.warning(
                "site %s could not prepare its data and is absent from every "
                "round of this run (%d of %d sites prepared, quorum %d): %s; "
                "restart the site and resume the study to include it again",
                site,
                len(prepared),
                len(self.sites),
                self.config.quorum,
                error,
            )
            tracker.log_event(f"failure.{site}.prepare", str(error))
        self.unprepared = set(failures)
        return prepared

    def _initial_model(self) -> bytes:
        strategy = self.config.strategy
        settings: dict[str, Any] = {
            "sites": self.sites,
            "strategy": strategy.name,
            "strategy_params": strategy.params,
            "wrappers": [
                [wrapper.name, wrapper.params] for wrapper in strategy.wrappers
            ],
            "secure_aggregation": self.config.secure_aggregation.model_dump(
                mode="json",
                # Left out when unset, so that the initial model of a study
                # created before the field existed stays the same bytes and
                # the service still accepts it when the study resumes.
                exclude={"key_exchange_seconds"}
                if self.config.secure_aggregation.key_exchange_seconds is None
                else None,
            ),
            "compression": {
                "codec": self.config.compression.codec,
                "params": self.config.compression.params,
            },
            "local_layers": list(strategy.local_layers),
        }
        asynchronous = self.config.round.asynchronous
        if asynchronous is not None:
            settings["asynchronous"] = {
                **asynchronous.model_dump(mode="json"),
                "max_versions": self.config.training.rounds,
            }
        return weights_to_safetensors(
            initial_model_weights(self.config),
            metadata={"medfed_study_settings": json.dumps(settings)},
        )

    def _run_round(
        self,
        client: AggregationClient,
        tracker: StudyTracker,
        round_number: int,
        *,
        skip: list[str],
    ) -> "_RoundResult":
        """Run one round: open it, train the sites, finalize or abort it."""
        deadline = self.config.round.deadline_seconds
        chosen = self._choose_sites(round_number)
        opened = chosen
        if self.config.secure_aggregation.mode == "masking":
            # A masking round waits for each of its sites to advertise keys,
            # and a site that could not prepare never does, so every round
            # would last until its deadline.
            opened = [site for site in chosen if site not in self.unprepared]
        client.open_round(
            self.config.study,
            round_number,
            sites=opened,
            quorum=self.config.quorum,
            deadline_seconds=deadline,
        )
        training = [
            site for site in chosen if site not in skip and site not in self.unprepared
        ]
        on_failure = None
        watch = None
        if self.config.secure_aggregation.mode == "masking":
            on_failure = partial(self._withdraw_failed_site, client, round_number)
            watch = MaskingRoundWatch(client, self.config.study, round_number)
        outcomes = _gather(
            {
                site: self.round_task.submit(
                    self.config,
                    site,
                    round_number,
                    self.aggregation_url,
                    self.site_dirs[site],
                )
                for site in training
            },
            timeout=deadline,
            on_failure=on_failure,
            done=watch,
        )
        reports: dict[str, dict[str, Any]] = {}
        absent = sorted(self.unprepared.intersection(chosen).difference(skip))
        for site, outcome in outcomes.items():
            if isinstance(outcome, _StoppedWaiting) and watch is not None:
                self._record_dropped(
                    tracker, round_number, site, watch.drop_reason(site)
                )
                absent.append(site)
            elif isinstance(outcome, BaseException):
                logger.warning(
                    "site %s failed in round %d: %s", site, round_number, outcome
                )
                tracker.log_event(f"failure.{site}.round{round_number}", str(outcome))
                self.failures.append(
                    {
                        "round": round_number,
                        "site": site,
                        "message": _failure_reason(outcome),
                    }
                )
                absent.append(site)
            elif outcome["status"] != "uploaded":
                self.refusals.append(
                    {"round": round_number, "site": site, "message": outcome["message"]}
                )
                tracker.log_event(
                    f"refusal.{site}.round{round_number}", outcome["message"]
                )
                absent.append(site)
                self.last_reports[site] = outcome
            else:
                reports[site] = outcome
                self.last_reports[site] = outcome
                totals = self.traffic.setdefault(site, {"uploaded": 0, "downloaded": 0})
                totals["uploaded"] += int(outcome["bytes_uploaded"])
                totals["downloaded"] += int(outcome["bytes_downloaded"])

        status = client.finalize(self.config.study, round_number, absent=absent)
        if status["state"] == "open" and "ckks" in status:
            status = self._decrypt(client, tracker, round_number, status)
        self.participants.append({
            "round": round_number,
            "asked": chosen,
            "uploaded": sorted(reports),
            "state": status["state"],
        })  # fmt: skip
        if status["state"] == "finalized":
            return _RoundResult(int(status["result_version"]), reports)
        tracker.log_event(f"abort.round{round_number}", status["reason"] or "aborted")
        if not reports and not skip:
            logger.warning(
                "stopping study %s: no site uploaded in round %d",
                self.config.study,
                round_number,
            )
            return _RoundResult(None, reports, stop=True)
        return _RoundResult(None, reports)

    def _record_dropped(
        self, tracker: StudyTracker, round_number: int, site: str, reason: str
    ) -> None:
        """Report a site that a masking round went on without while its task ran.

        A deployed site's flow run is cancelled.

        NOTE: an in-process site's task thread cannot be stopped, so a hung
        site's thread keeps running after the flow moves on. It occupies one of
        the task runner's threads, and the flow's end waits for it, because
        Prefect's ``ThreadPoolTaskRunner`` shuts its pool down with
        ``wait=True`` (Prefect 3.9).
        """
        logger.warning("site %s %s", site, reason)
        tracker.log_event(f"dropped.{site}.round{round_number}", reason)
        self.dropped.append({"round": round_number, "site": site, "message": reason})
        if self.deployed_sites:
            from medfed.flows import deployments

            deployments.abandon_site_flow(
                deployments.site_round_run_name(self.config.study, site, round_number)
            )

    def _withdraw_failed_site(
        self,
        client: AggregationClient,
        round_number: int,
        site: str,
        error: BaseException,
    ) -> None:
        """Withdraw a site whose round task failed from the round's masking round.

        A masking round waits for every site that shared keys to upload or
        withdraw. A site that fails with a Python error withdraws itself, but
        one whose process was killed or lost the network cannot, and would
        hold the other sites until the round's deadline. A withdrawal that
        the service rejects, because the site uploaded before it failed or
        the round was closed or aborted, is logged and does not fail the round.

        NOTE: a site that hangs without its task failing is not withdrawn.
        If it hangs before it shared keys, the service drops it at the
        key-exchange deadline and ``MaskingRoundWatch`` ends the wait once the
        others revealed. If it hangs after, the round waits for its upload
        until the round's deadline.
        """
        try:
            withdrawn = client.withdraw_site(self.config.study, round_number, site)
        except ServiceError as rejection:
            log = logger.info if rejection.status_code in (404, 409) else logger.warning
            log(
                "could not withdraw site %s from masking round %d after its task "
                "failed: %s",
                site, round_number, rejection,
            )  # fmt: skip
            return
        if not withdrawn:
            return
        logger.warning(
            "withdrew site %s from masking round %d on the coordinator's behalf "
            "after its task failed: %s",
            site, round_number, _failure_reason(error),
        )  # fmt: skip
        self.withdrawals.append({"round": round_number, "site": site})

    def _choose_sites(self, round_number: int) -> list[str]:
        participation = self.config.round.participation
        if participation.round_size(len(self.sites)) == len(self.sites):
            return list(self.sites)
        eligible = self.sites
        if participation.weighted:
            # NOTE: a site that could not prepare has no sample count, so a
            # weighted choice leaves it out, and the sites chosen differ from
            # those of a run in which every site prepared.
            eligible = [site for site in self.sites if site in self.train_records]
        chosen = select_sites(
            eligible,
            self.train_records,
            round_number,
            fraction=participation.fraction,
            minimum=participation.minimum,
            weighted=participation.weighted,
            seed=self.config.training.seed,
        )
        logger.info("round %d asks sites %s", round_number, chosen)
        return chosen

    def _decrypt(
        self,
        client: AggregationClient,
        tracker: StudyTracker,
        round_number: int,
        status: dict[str, Any],
    ) -> dict[str, Any]:
        """Have one contributor decrypt the round's sum, then finalize again.

        Contributors are tried in sorted order until one succeeds.

        Raises:
            AggregationError: no contributor could decrypt the sum. The round
                stays open, so ``--resume`` retries the decryption.
        """
        failures = []
        for site in sorted(status["ckks"]["contributors"]):
            if status["ckks"]["phase"] != "decrypting":
                break
            future = self.decrypt_task.submit(
                self.config,
                site,
                round_number,
                self.aggregation_url,
                self.site_dirs[site],
            )
            outcome = _gather(
                {site: future}, timeout=self.config.round.deadline_seconds
            )[site]
            if isinstance(outcome, BaseException):
                logger.warning(
                    "site %s failed to decrypt round %d: %s",
                    site,
                    round_number,
                    outcome,
                )
                tracker.log_event(f"failure.{site}.decrypt{round_number}", str(outcome))
                failures.append(f"site {site}: {outcome}")
                continue
            status = client.round_status(self.config.study, round_number)
        if status["ckks"]["phase"] == "decrypting":
            raise AggregationError(
                f"no contributor could decrypt the sum of round {round_number}: "
                + "; ".join(failures)
                + "; fix the sites and run again with --resume"
            )
        return client.finalize(self.config.study, round_number)

    def _evaluate(self, version: int) -> None:
        """Have every site evaluate model ``version``; keep the aggregates.

        With ``operating_point: youden`` the sites first evaluate their
        validation splits, the threshold is chosen on the pooled validation
        histograms, and test accuracy is counted at that threshold.
        """
        if self.config.evaluation.operating_point == "fixed":
            self.evaluations = self._site_aggregates(version, "test")
            return
        validation = self._site_aggregates(version, "val")
        if validation:
            self.threshold = youden_threshold(pool(list(validation.values())))
        self.evaluations = {
            site: aggregates.at_threshold(self.threshold)
            for site, aggregates in self._site_aggregates(version, "test").items()
        }

    def _site_aggregates(
        self, version: int, split: Literal["test", "val"]
    ) -> dict[str, EvaluationAggregates]:
        evaluated = _gather({
            site: self.evaluation_task.submit(self.config, site, version, self.aggregation_url, self.site_dirs[site], split)
            for site in self.sites
            if site not in self.unprepared
        })  # fmt: skip
        return {
            site: EvaluationAggregates(**value)
            for site, value in evaluated.items()
            if not isinstance(value, BaseException)
        }

    def _epsilon_spent(self, site: str, prepared: dict[str, Any]) -> float | None:
        """Return the site's cumulative epsilon from its latest report.

        A resumed run skips the sites that uploaded to the open round before
        the stop, so their charge for that round is in no report of this run.
        The epsilon that the site's ledger listed when it prepared covers it,
        and epsilon only grows, so the larger of the two is the latest.
        """
        values = [
            value
            for value in (
                self.last_reports.get(site, {}).get("epsilon_spent"),
                prepared.get(site, {}).get("epsilon_spent"),
            )
            if value is not None
        ]
        return max(values) if values else None

    def _finish(
        self,
        client: AggregationClient,
        tracker: StudyTracker,
        prepared: dict[str, Any],
        version: int,
    ) -> dict[str, Any]:
        final = client.download_model(self.config.study, version)
        if not self.evaluations:
            self._evaluate(version)
        epsilon = {site: self._epsilon_spent(site, prepared) for site in self.sites}
        lineage = _lineage(self.config, prepared, self.last_reports, epsilon)
        registered = tracker.register_model(
            load_safetensors(weights_to_safetensors(final.weights)),
            version=version,
            round_number=self.last_round,
            sites=self.sites,
            lineage={
                **lineage,
                "medfed.model_sha256": final.sha256,
                "medfed.decision_threshold": str(self.threshold),
            },
        )
        pooled = pool(list(self.evaluations.values()))
        evaluations = self.evaluations
        return {
            "study": self.config.study,
            "rounds": version,
            "model_version": version,
            "model_sha256": final.sha256,
            "registered_model_version": registered,
            "pooled_test_accuracy": pooled.accuracy,
            "pooled_test_auc": pooled.auc,
            "decision_threshold": self.threshold,
            "participants": self.participants,
            "refusals": self.refusals,
            "withdrawals": self.withdrawals,
            "dropped": self.dropped,
            "round_seconds": self.round_seconds,
            "sites": {
                site: {
                    "test_accuracy": evaluations[site].accuracy
                    if site in evaluations
                    else None,
                    "test_auc": evaluations[site].auc if site in evaluations else None,
                    "test_records": evaluations[site].records
                    if site in evaluations
                    else None,
                    "epsilon_spent": epsilon[site],
                    "train_records": prepared.get(site, {}).get("train_records"),
                    "bytes_uploaded": self.traffic.get(site, {}).get("uploaded", 0),
                    "bytes_downloaded": self.traffic.get(site, {}).get("downloaded", 0),
                }
                for site in self.sites
            },
        }


def _resume_point(latest_round: dict[str, Any] | None) -> tuple[int, list[str]]:
    """Return the round to run next and the sites that already uploaded to it."""
    if latest_round is None:
        return 0, []
    if latest_round["state"] == "open":
        return int(latest_round["round"]), list(latest_round["uploaded"])
    return int(latest_round["round"]) + 1, []


def _lineage(
    config: StudyConfig,
    prepared: dict[str, Any],
    reports: dict[str, dict[str, Any]],
    epsilon_spent: dict[str, float | None],
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
                report.get("noise_multiplier", info["privacy"].get("noise_multiplier"))
            )
            tags[f"medfed.dp.{site}.epsilon_spent"] = str(epsilon_spent.get(site))
    return tags


def _failure_reason(error: BaseException) -> str:
    """Return a site's error as one line of at most 300 characters.

    Errors from outside medfed (torch, for example) keep their type name in
    front, because their message alone can be ambiguous.
    """
    # NOTE: the text is the one already logged and tagged in MLflow. A
    # library's message could quote a value from the data, and the cut to
    # 300 characters only limits how much of it reaches the study error.
    text = " ".join(str(error).split()) or "no message"
    if not isinstance(error, MedfedError):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


class _StoppedWaiting(Exception):
    """A site's task was still running when ``_gather``'s ``done`` returned True."""


def _gather(
    futures: dict[str, PrefectFuture[Any]],
    timeout: float | None = None,
    *,
    on_failure: Callable[[str, Exception], None] | None = None,
    done: Callable[[set[str]], bool] | None = None,
    poll_seconds: float = 1.0,
) -> dict[str, Any]:
    """Wait for every future until ``timeout`` seconds from now.

    Maps each site, in the order of ``futures``, to its result, or to the
    exception it raised, or to a ``TimeoutError`` when it did not finish in
    time: one failed or silent site must not stop the others. Futures are
    read in the order they finish, so ``on_failure(site, error)`` runs in
    this thread as soon as a site's task raises, while the others still run.
    It is not called for sites that time out.

    ``done(pending)``, when given, is called in this thread with the sites
    still running, at least every ``poll_seconds`` while some run. Once it
    returns True the wait ends, and those sites map to ``_StoppedWaiting``.
    Their tasks keep running.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    finished: queue.SimpleQueue[str] = queue.SimpleQueue()

    def notify(site: str, _: PrefectFuture[Any]) -> None:
        finished.put(site)

    for site, future in futures.items():
        # Prefect calls back from the thread that finished the task, or at
        # once when the task has already finished.
        future.add_done_callback(partial(notify, site))
    results: dict[str, Any] = {}
    next_poll = time.monotonic() + poll_seconds
    while len(results) < len(futures):
        now = time.monotonic()
        remaining = None if deadline is None else max(0.0, deadline - now)
        if done is not None:
            until_poll = max(0.0, next_poll - now)
            remaining = until_poll if remaining is None else min(remaining, until_poll)
        try:
            site = finished.get(timeout=remaining)
        except queue.Empty:
            if done is None or (deadline is not None and time.monotonic() >= deadline):
                break
            next_poll = time.monotonic() + poll_seconds
            pending = set(futures) - set(results)
            if done(pending):
                for site in pending:
                    results[site] = _StoppedWaiting(
                        f"site {site} was still running when the flow stopped "
                        "waiting for it"
                    )
                break
            continue
        try:
            results[site] = futures[site].result(timeout=0)
        except Exception as error:
            results[site] = error
            if on_failure is not None:
                on_failure(site, error)
    for site in futures:
        if site not in results:
            results[site] = TimeoutError(
                f"site {site} did not finish before the round deadline of {timeout} s"
            )
    return {site: results[site] for site in futures}


def check_local_data(config: StudyConfig, work_dir: Path) -> None:
    """Check that every site of a local study can read its raw data file.

    It runs before any service starts, so a missing or altered file fails in
    seconds. Sites whose data is already preprocessed in ``work_dir`` pass.
    Sites deployed in their own containers hold their own data and are not
    checked here.

    Raises:
        ConfigError, DataError: naming each site's problem, one site after
            the other.
    """
    problems: list[str] = []
    first: MedfedError | None = None
    for site in config.sites:
        runner = SiteRunner(config, site.id, work_dir / "sites" / site.id)
        try:
            runner.check_source()
        except MedfedError as error:
            problems.append(f"site {site.id}: {error}")
            first = first or error
    if first is not None:
        raise type(first)("; ".join(problems))


def run_study(
    config: StudyConfig,
    config_text: str,
    *,
    work_dir: Path,
    listener: RoundListener | None = None,
    resume: bool = False,
    deployed_sites: bool = False,
    kit_dir: Path | None = None,
) -> dict[str, Any]:
    """Run a study in local mode: start the service, run the flow, stop the service.

    The service keeps its state in ``work_dir/aggregation``, so a resumed
    study finds its rounds and uploads there. With ``aggregation.url`` set
    the flow uses that service instead, authenticated with the coordinator
    kit ``kit_dir`` when one is given. Unless ``deployed_sites``, the sites'
    data files are checked first (``check_local_data``), before any service
    starts.
    """
    from medfed.flows.local import LocalAggregationService

    if not deployed_sites:
        check_local_data(config, work_dir)
    # Local mode trains every site at once in this process, so each site gets
    # an equal share of the cores instead of every torch op spawning threads
    # that contend for all of them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(config.sites)))
    if listener is not None:
        _listeners.append(listener)
    try:
        if config.aggregation.url:
            return federated_training(
                config,
                config_text,
                str(work_dir),
                config.aggregation.url,
                resume,
                deployed_sites,
                str(kit_dir) if kit_dir is not None else None,
            )
        with LocalAggregationService(
            work_dir / "aggregation",
            max_upload_bytes=config.aggregation.max_upload_bytes,
            max_concurrency=config.aggregation.max_concurrency,
        ) as service:
            return federated_training(
                config, config_text, str(work_dir), service.url, resume
            )
    finally:
        if listener is not None:
            _listeners.remove(listener)
