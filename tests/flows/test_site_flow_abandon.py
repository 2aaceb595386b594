"""Cancelling a deployed site's flow run that the coordinator stopped waiting for.

The site pool has no worker, so the run stays scheduled, as for a site
whose container hangs, against a real Prefect API.
"""

import threading
import time
from typing import Any

import pytest
import yaml

from medfed.contract.config import parse_study_config
from medfed.errors import SiteRunError
from medfed.flows import deployments
from tests.conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("prefect_api")

RUN_NAME = "cleveland: abandon-test round 0"


def read_run_state(name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name]))
        )
    return run.state


@pytest.mark.timeout(120)
def test_abandoned_site_run_cancelled() -> None:
    from prefect.settings import PREFECT_API_URL

    deployments.register_site_deployments(
        ["cleveland"], api_url=str(PREFECT_API_URL.value())
    )
    raw = yaml.safe_load((CONFIGS / "heart_disease_nodp.yaml").read_text())
    raw["study"] = "abandon-test"
    config = parse_study_config(raw)
    outcome: dict[str, SiteRunError] = {}

    def wait_for_run() -> None:
        try:
            deployments.run_site_flow(
                "site_round",
                "cleveland",
                {
                    "config": config.model_dump(mode="json"),
                    "site_id": "cleveland",
                    "round_number": 0,
                    "aggregation_url": "http://127.0.0.1:9",
                },
                timeout=300,
                flow_run_name=RUN_NAME,
            )
        except SiteRunError as error:
            outcome["error"] = error

    waiter = threading.Thread(target=wait_for_run)
    waiter.start()
    abandoned = False
    for _ in range(100):
        abandoned = deployments.abandon_site_flow(RUN_NAME)
        if abandoned:
            break
        time.sleep(0.2)
    waiter.join(timeout=30)

    assert abandoned
    assert not waiter.is_alive()
    assert isinstance(outcome.get("error"), SiteRunError)
    assert "stopped waiting" in str(outcome["error"])
    state = read_run_state(RUN_NAME)
    assert state.is_cancelled()
    assert state.message == "the coordinator stopped waiting for it"
    assert not deployments.abandon_site_flow(RUN_NAME)
