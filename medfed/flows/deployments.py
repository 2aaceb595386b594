"""Deployment mode: each site's work pool, deployments and remote flow runs.

A site is reached only through its Prefect work pool ``site-<site_id>``. The
coordinator creates the pool and, in it, one deployment of each site flow
(``site_prepare``, ``site_round``, ``site_update``, ``site_decrypt``,
``site_evaluation``).
The site's worker
polls the pool and runs those flows inside the site's container. Deployments
name their flow by module path, so the worker imports it from the medfed
package installed in its image and no code is pulled at run time.

``run_site_flow`` starts one of those flows with ``run_deployment`` and waits
at most a deadline. A run still unfinished at the deadline (its site is down
or slow) is cancelled, so a site that comes back never trains for a round
that has closed.

Every call the coordinator makes to the Prefect API here is retried with
exponential backoff when it fails with a server error (HTTP 5xx) or a
connection error. Prefect's own client already retries 429, 502 and 503, but
a loaded server also answers 500 (a locked SQLite database) and refuses
connections, and a 503 can outlast the client's retries.
"""

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal, TypeVar, cast

from prefect import task
from prefect.cache_policies import NONE

from medfed.contract.config import StudyConfig
from medfed.contract.ids import validate_identifier
from medfed.errors import SiteRunError

__all__ = [
    "PREFECT_API_ATTEMPTS",
    "SITE_FLOW_NAMES",
    "abandon_site_flow",
    "call_prefect_api",
    "deployed_site_decrypt",
    "deployed_site_evaluation",
    "deployed_site_prepare",
    "deployed_site_round",
    "deployed_site_update",
    "register_site_deployments",
    "run_site_flow",
    "site_deployment_name",
    "site_pool_name",
    "site_round_run_name",
]

logger = logging.getLogger(__name__)

#: The flows each site pool gets a deployment of.
SITE_FLOW_NAMES = (
    "site_prepare",
    "site_round",
    "site_update",
    "site_decrypt",
    "site_evaluation",
)

#: Seconds between checks of a remote flow run's state.
POLL_SECONDS = 1.0

#: Attempts of one Prefect API call before its error is raised. The first
#: retry waits the base seconds, and each later wait doubles up to the max.
PREFECT_API_ATTEMPTS = 6
PREFECT_API_FIRST_BACKOFF = 1.0
PREFECT_API_MAX_BACKOFF = 30.0

_Result = TypeVar("_Result")

#: The event of each ``run_site_flow`` call still waiting, by flow run name.
#: Setting it makes the call cancel its run at the next poll.
_waiting_runs: dict[str, threading.Event] = {}
_waiting_runs_lock = threading.Lock()


def abandon_site_flow(flow_run_name: str) -> bool:
    """Have the ``run_site_flow`` waiting for ``flow_run_name`` cancel the run.

    The call cancels the run within ``POLL_SECONDS`` and raises
    ``SiteRunError``. Returns False, and changes nothing, when no call in this
    process waits for a run of that name.
    """
    with _waiting_runs_lock:
        abandoned = _waiting_runs.get(flow_run_name)
    if abandoned is None:
        return False
    abandoned.set()
    return True


def call_prefect_api(action: str, call: Callable[[], _Result]) -> _Result:
    """Run ``call`` and retry it while the Prefect API fails transiently.

    Server errors (HTTP 5xx) and connection errors are retried up to
    ``PREFECT_API_ATTEMPTS`` attempts in all, with exponential backoff, and
    each retry is logged with ``action``. Other errors, such as a 404 for a
    missing deployment, are raised at once. Callers must make ``call`` safe to
    repeat (an idempotency key for creations).

    Raises:
        The last error of ``call`` once the attempts are used up.
    """
    backoff = PREFECT_API_FIRST_BACKOFF
    for attempt in range(1, PREFECT_API_ATTEMPTS + 1):
        try:
            return call()
        except Exception as error:
            if attempt == PREFECT_API_ATTEMPTS or not _is_transient(error):
                raise
            logger.warning(
                "Prefect API call to %s failed (attempt %d of %d): %s; "
                "retrying in %.0f s",
                action,
                attempt,
                PREFECT_API_ATTEMPTS,
                _describe(error),
                backoff,
            )
        time.sleep(backoff)
        backoff = min(backoff * 2, PREFECT_API_MAX_BACKOFF)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _is_transient(error: BaseException) -> bool:
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


def _describe(error: BaseException) -> str:
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code} from {error.request.url}"
    return f"{type(error).__name__}: {error}"


def site_pool_name(site_id: str) -> str:
    """Return the name of the work pool that ``site_id``'s worker polls."""
    return f"site-{validate_identifier(site_id, kind='site')}"


def site_deployment_name(flow_name: str, site_id: str) -> str:
    """Return the ``<flow>/<deployment>`` name that ``run_deployment`` takes."""
    if flow_name not in SITE_FLOW_NAMES:
        raise ValueError(
            f"unknown site flow {flow_name!r}; expected one of "
            + ", ".join(SITE_FLOW_NAMES)
        )
    return f"{flow_name}/{site_pool_name(site_id)}"


def register_site_deployments(
    site_ids: Iterable[str], *, api_url: str
) -> dict[str, str]:
    """Create each site's process work pool and its site flow deployments.

    Idempotent: existing pools are kept and existing deployments updated.

    Args:
        site_ids: the study's site identifiers.
        api_url: the Prefect API, e.g. ``http://127.0.0.1:4200/api``.

    Returns:
        The work pool name of each site.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType, RunnerDeployment
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from medfed.flows.site_round import (
        site_decrypt,
        site_evaluation,
        site_prepare,
        site_round,
        site_update,
    )

    site_flows = (site_prepare, site_round, site_update, site_decrypt, site_evaluation)

    pools = {}
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        for site_id in site_ids:
            pool = site_pool_name(site_id)
            try:
                pool_create = WorkPoolCreate(name=pool, type="process")
                call_prefect_api(
                    f"create work pool {pool}",
                    partial(client.create_work_pool, pool_create),
                )
                logger.info("created work pool %s", pool)
            except ObjectAlreadyExists:
                pass
            for site_flow in site_flows:
                deployment = cast(
                    RunnerDeployment,
                    site_flow.to_deployment(
                        name=pool,
                        work_pool_name=pool,
                        entrypoint_type=EntrypointType.MODULE_PATH,
                        tags=["medfed", f"site:{site_id}"],
                    ),
                )
                # Applying upserts the deployment by name, so a retry is safe.
                call_prefect_api(
                    f"apply deployment {site_flow.name}/{pool}", deployment.apply
                )
            pools[site_id] = pool
            logger.info("registered the site flows of %s in pool %s", site_id, pool)
    return pools


def run_site_flow(
    flow_name: str,
    site_id: str,
    parameters: dict[str, Any],
    *,
    timeout: float,
    flow_run_name: str,
) -> dict[str, Any]:
    """Run a site flow in the site's work pool; return the site's report.

    Args:
        flow_name: one of ``SITE_FLOW_NAMES``.
        site_id: the site whose pool runs the flow.
        parameters: the flow's parameters, JSON-compatible.
        timeout: seconds to wait for the run to finish, counted from its
            creation, so a site whose worker is down uses the whole deadline.
        flow_run_name: name given to the run when it is created, so a run
            that never starts (its site is down) is still recognizable.

    Raises:
        SiteRunError: the run did not finish within ``timeout`` or before
            ``abandon_site_flow(flow_run_name)`` (it is then cancelled), or
            it finished in a state other than Completed.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    name = site_deployment_name(flow_name, site_id)
    # The server returns the existing run for a known idempotency key, so a
    # retried creation never starts the site flow twice.
    idempotency_key = f"{flow_run_name} {uuid.uuid4().hex}"
    flow_run = call_prefect_api(
        f"create flow run {flow_run_name!r}",
        lambda: cast(
            FlowRun,
            run_deployment(
                name,
                parameters=parameters,
                timeout=0,
                flow_run_name=flow_run_name,
                idempotency_key=idempotency_key,
            ),
        ),
    )
    started = time.monotonic()
    run_id, run_name = flow_run.id, flow_run.name
    abandoned = threading.Event()
    with _waiting_runs_lock:
        _waiting_runs[flow_run_name] = abandoned
    try:
        with get_client(sync_client=True) as client:
            state = flow_run.state
            while not (state is not None and state.is_final()):
                if time.monotonic() - started >= timeout:
                    break
                if abandoned.wait(POLL_SECONDS):
                    break
                state = call_prefect_api(
                    f"read flow run {run_name!r}",
                    lambda: client.read_flow_run(run_id),
                ).state
            if state is None or not state.is_final():
                reason = (
                    "the coordinator stopped waiting for it"
                    if abandoned.is_set()
                    else f"deadline of {timeout:.0f} s passed"
                )
                call_prefect_api(
                    f"cancel flow run {run_name!r}",
                    lambda: client.set_flow_run_state(
                        run_id, Cancelled(message=reason), force=True
                    ),
                )
                if abandoned.is_set():
                    raise SiteRunError(
                        f"site {site_id} did not finish {flow_name} before the "
                        f"coordinator stopped waiting for it (flow run {run_name} "
                        f"was {state.name if state else 'unknown'}, now cancelled)"
                    )
                raise SiteRunError(
                    f"site {site_id} did not finish {flow_name} within "
                    f"{timeout:.0f} s (flow run {run_name} was "
                    f"{state.name if state else 'unknown'}, now cancelled); check "
                    "that the site's container and worker are running"
                )
    finally:
        with _waiting_runs_lock:
            if _waiting_runs.get(flow_run_name) is abandoned:
                del _waiting_runs[flow_run_name]
    if not state.is_completed():
        raise SiteRunError(
            f"site {site_id} {flow_name} ended {state.name}: "
            f"{state.message or 'no message'} (flow run {run_name})"
        )
    return _read_report(run_id, site_id, flow_name)


def _read_report(flow_run_id: Any, site_id: str, flow_name: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from medfed.flows.site_round import REPORT_ARTIFACT_DESCRIPTION

    with get_client(sync_client=True) as client:
        artifacts = call_prefect_api(
            f"read the report of flow run {flow_run_id}",
            lambda: client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            ),
        )
    for artifact in artifacts:
        if artifact.description == REPORT_ARTIFACT_DESCRIPTION and artifact.data:
            data: Any = artifact.data
            rows = json.loads(data) if isinstance(data, str) else data
            report: dict[str, Any] = json.loads(rows[0]["report"])
            return report
    raise SiteRunError(
        f"site {site_id} {flow_name} completed without a report artifact "
        f"(flow run {flow_run_id}); the site's image may run an older medfed"
    )


# The tasks below take the same arguments as the local-mode site tasks in
# medfed.flows.training, so federated_training switches between local and
# deployment mode by choosing which tasks it submits. ``state_dir`` is
# ignored: a deployed site keeps its state in its own container.


@task(
    name="site_prepare",
    task_run_name="{site_id}: prepare data (deployed)",
    cache_policy=NONE,
    persist_result=False,
)
def deployed_site_prepare(
    config: StudyConfig, site_id: str, state_dir: str
) -> dict[str, Any]:
    """Run ``site_prepare`` in the site's pool; wait up to the round deadline."""
    return run_site_flow(
        "site_prepare",
        site_id,
        {"config": _config_parameter(config), "site_id": site_id},
        timeout=config.round.deadline_seconds,
        flow_run_name=f"{site_id}: prepare {config.study}",
    )


@task(
    name="site_round",
    task_run_name="{site_id}: train round {round_number} (deployed)",
    cache_policy=NONE,
    persist_result=False,
)
def deployed_site_round(
    config: StudyConfig,
    site_id: str,
    round_number: int,
    aggregation_url: str,
    state_dir: str,
) -> dict[str, Any]:
    """Run ``site_round`` in the site's pool; wait up to the round deadline."""
    parameters = {
        "config": _config_parameter(config),
        "site_id": site_id,
        "round_number": round_number,
        "aggregation_url": aggregation_url,
    }
    return run_site_flow(
        "site_round",
        site_id,
        parameters,
        timeout=config.round.deadline_seconds,
        flow_run_name=site_round_run_name(config.study, site_id, round_number),
    )


def site_round_run_name(study: str, site_id: str, round_number: int) -> str:
    """Return the flow run name of a site's ``site_round`` run."""
    return f"{site_id}: {study} round {round_number}"


@task(
    name="site_asynchronous_update",
    task_run_name="{site_id}: train update {update_number} (deployed)",
    cache_policy=NONE,
    persist_result=False,
)
def deployed_site_update(
    config: StudyConfig,
    site_id: str,
    update_number: int,
    aggregation_url: str,
    state_dir: str,
) -> dict[str, Any]:
    """Run ``site_update`` in the site's pool; wait up to the round deadline."""
    parameters = {
        "config": _config_parameter(config),
        "site_id": site_id,
        "update_number": update_number,
        "aggregation_url": aggregation_url,
    }
    return run_site_flow(
        "site_update",
        site_id,
        parameters,
        timeout=config.round.deadline_seconds,
        flow_run_name=f"{site_id}: {config.study} update {update_number}",
    )


@task(
    name="site_decrypt",
    task_run_name="{site_id}: decrypt round {round_number} (deployed)",
    cache_policy=NONE,
    persist_result=False,
)
def deployed_site_decrypt(
    config: StudyConfig,
    site_id: str,
    round_number: int,
    aggregation_url: str,
    state_dir: str,
) -> dict[str, Any]:
    """Run ``site_decrypt`` in the site's pool; wait up to the round deadline."""
    parameters = {
        "config": _config_parameter(config),
        "site_id": site_id,
        "round_number": round_number,
        "aggregation_url": aggregation_url,
    }
    return run_site_flow(
        "site_decrypt",
        site_id,
        parameters,
        timeout=config.round.deadline_seconds,
        flow_run_name=f"{site_id}: {config.study} decrypt round {round_number}",
    )


@task(
    name="site_evaluation",
    task_run_name="{site_id}: evaluate model {version} (deployed)",
    cache_policy=NONE,
    persist_result=False,
)
def deployed_site_evaluation(
    config: StudyConfig,
    site_id: str,
    version: int,
    aggregation_url: str,
    state_dir: str,
    split: Literal["test", "val"] = "test",
) -> dict[str, Any]:
    """Run ``site_evaluation`` in the site's pool; wait up to the round deadline."""
    parameters = {
        "config": _config_parameter(config),
        "site_id": site_id,
        "version": version,
        "aggregation_url": aggregation_url,
        "split": split,
    }
    return run_site_flow(
        "site_evaluation",
        site_id,
        parameters,
        timeout=config.round.deadline_seconds,
        flow_run_name=f"{site_id}: {config.study} evaluate model {version} on {split}",
    )


def _config_parameter(config: StudyConfig) -> dict[str, Any]:
    # Flow run parameters travel as JSON; the site flow validates them back
    # into a StudyConfig.
    return config.model_dump(mode="json")
