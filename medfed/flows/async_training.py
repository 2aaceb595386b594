"""Asynchronous studies in the ``federated_training`` flow.

With ``round.asynchronous`` set, every site loops on its own: download the
latest global version, train under its privacy ledger, upload. The
aggregation service publishes a version every ``buffer_size`` arrivals
(``medfed.aggregation.async_rounds``). The flow runs each site update as one
Prefect task. It starts a site's next update only once the service has
published a version newer than the one the site last trained from. So a site
contributes at most one update per version, and a retried upload is never
taken for a new one.

The study ends when the service has published ``training.rounds`` versions,
or when no site can train any more: each has failed, rejected an update to
stay within its privacy budget, or trained ``training.rounds`` times. The flow
then starts no more updates but waits, each within ``round.deadline_seconds``,
for the updates still running. Their privacy cost is in the site's ledger
whatever the service does with them, so their reports give each site's final
epsilon spent. The service rejects an update that arrives after the last
version, and the site reports ``study_finished``.
"""

import concurrent.futures
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.futures import PrefectConcurrentFuture

from medfed.contract.config import StudyConfig
from medfed.errors import QuorumError
from medfed.flows.tracking import StudyTracker
from medfed.sites.client import AggregationClient
from medfed.sites.runner import SiteRunner, connect_site

if TYPE_CHECKING:
    from medfed.flows.training import _Coordinator

__all__ = ["run_asynchronous", "site_asynchronous_update"]

logger = logging.getLogger(__name__)

#: Seconds between checks of the running site updates and the service.
POLL_SECONDS = 0.2


@task(
    name="site_asynchronous_update",
    task_run_name="{site_id}: train update {update_number}",
    cache_policy=NONE,
    persist_result=False,
)
def site_asynchronous_update(
    config: StudyConfig,
    site_id: str,
    update_number: int,
    aggregation_url: str,
    state_dir: str,
) -> dict[str, Any]:
    """Train one site on the latest global version and upload the update."""
    client, signer = connect_site(aggregation_url)
    runner = SiteRunner(config, site_id, Path(state_dir), signer=signer)
    return runner.train_asynchronous(client, update_number).to_dict()


def run_asynchronous(
    coordinator: "_Coordinator", client: AggregationClient, tracker: StudyTracker
) -> int:
    """Run the sites' update loops until the study ends; return the final version.

    Raises:
        QuorumError: no version was published; the message gives each
            site's reason.
    """
    from medfed.flows.training import _failure_reason, _listeners

    config = coordinator.config
    study = config.study
    rounds = config.training.rounds
    deadline = config.round.deadline_seconds
    started = time.monotonic()
    status = client.asynchronous_status(study)
    # A resumed study continues each site's update count and last base version.
    # NOTE: the service stores no rejected update, so an update rejected as
    # too stale before a resume is not counted here. The site may then train
    # more than training.rounds times, but its ledger still rejects any
    # update over its budget.
    updates = Counter(arrival["site"] for arrival in status["arrivals"])
    last_base: dict[str, int] = {}
    for arrival in status["arrivals"]:
        site = arrival["site"]
        last_base[site] = max(last_base.get(site, -1), arrival["base_version"])
    latest = int(status["latest_version"])
    running: dict[str, tuple[PrefectConcurrentFuture[Any], float, int]] = {}
    stopped: set[str] = set(coordinator.unprepared)

    while True:
        for site, (future, submitted, number) in list(running.items()):
            if future.wrapped_future.done():
                try:
                    outcome: Any = future.result()
                except Exception as error:
                    outcome = error
            elif time.monotonic() - submitted > deadline:
                outcome = TimeoutError(
                    f"site {site} did not finish update {number} within "
                    f"round.deadline_seconds = {deadline} s"
                )
            else:
                continue
            del running[site]
            if isinstance(outcome, BaseException):
                logger.warning("site %s failed in update %d: %s", site, number, outcome)
                tracker.log_event(f"failure.{site}.update{number}", str(outcome))
                coordinator.failures.append(
                    {
                        "update": number,
                        "site": site,
                        "message": _failure_reason(outcome),
                    }
                )
                stopped.add(site)
                continue
            coordinator.last_reports[site] = outcome
            if outcome["status"] == "rejected_budget":
                coordinator.refusals.append(
                    {"update": number, "site": site, "message": outcome["message"]}
                )
                tracker.log_event(f"refusal.{site}.update{number}", outcome["message"])
                stopped.add(site)
            elif outcome["status"] == "rejected_stale":
                # The site trained and spent privacy budget, so the update
                # counts against training.rounds, and the site trains again
                # from the next version.
                updates[site] += 1
                last_base[site] = int(outcome["base_version"])
                coordinator.stale_rejections.append(
                    {"update": number, "site": site, "message": outcome["message"]}
                )
                tracker.log_event(f"stale.{site}.update{number}", outcome["message"])
            elif outcome["status"] == "uploaded":
                updates[site] += 1
                last_base[site] = int(outcome["base_version"])
                totals = coordinator.traffic.setdefault(
                    site, {"uploaded": 0, "downloaded": 0}
                )
                totals["uploaded"] += int(outcome["bytes_uploaded"])
                totals["downloaded"] += int(outcome["bytes_downloaded"])

        status = client.asynchronous_status(study)
        while latest < status["latest_version"]:
            latest += 1
            coordinator.version_seconds.append(time.monotonic() - started)
            tracker.log_published(latest)
            logger.info("study %s published version %d", study, latest)
            # Sites evaluate only the final version, so the summary carries
            # no pooled metrics.
            for listener in list(_listeners):
                listener(latest - 1, {"round": latest - 1, "version": latest})
        # A finished study starts no update but waits for those still running.
        for site in [] if status["finished"] else coordinator.sites:
            if site in running or site in stopped or updates[site] >= rounds:
                continue
            if last_base.get(site, -1) >= latest:
                # One update per version: wait for the next version.
                continue
            future = coordinator.asynchronous_task.submit(
                config,
                site,
                updates[site],
                coordinator.aggregation_url,
                coordinator.site_dirs[site],
            )
            running[site] = (future, time.monotonic(), updates[site])
        if not running:
            break
        concurrent.futures.wait(
            [future.wrapped_future for future, _, _ in running.values()],
            timeout=POLL_SECONDS,
            return_when=concurrent.futures.FIRST_COMPLETED,
        )

    if latest < rounds:
        reason = (
            f"no site can train any more after version {latest} of {rounds}: "
            + _stop_reasons(coordinator)
        )
        logger.warning("study %s stopped early: %s", study, reason)
        tracker.log_event("asynchronous.stopped", reason)
    if latest == 0:
        raise QuorumError(
            f"study {study!r} published no version; " + _stop_reasons(coordinator)
        )
    return latest


def asynchronous_summary(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Return each site's updates in the service's arrival records.

    Per site: the number of updates the service accepted, how many of them
    went into a published version, and the staleness of each, in order.
    """
    sites: dict[str, dict[str, Any]] = {}
    for arrival in status["arrivals"]:
        entry = sites.setdefault(
            arrival["site"], {"updates": 0, "aggregated_updates": 0, "staleness": []}
        )
        entry["updates"] += 1
        entry["aggregated_updates"] += arrival["aggregated_version"] is not None
        entry["staleness"].append(arrival["staleness"])
    return sites


def _stop_reasons(coordinator: "_Coordinator") -> str:
    reasons = [
        f"site {failure['site']} failed: {failure['message']}"
        for failure in coordinator.failures
    ]
    reasons += [refusal["message"] for refusal in coordinator.refusals]
    reasons += [
        f"site {site} could not prepare its data" for site in coordinator.unprepared
    ]
    return "; ".join(reasons) or "every site trained training.rounds times"
