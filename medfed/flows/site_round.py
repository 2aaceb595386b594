"""Flows that run at a site, started through the site's Prefect work pool.

In deployment mode the coordinator starts these flows with
``run_deployment``, and the site's worker runs them inside the site's
container. There the data is mounted read-only at ``MEDFED_DATA_DIR`` and the
site's private state (preprocessed data, privacy ledger) lives under
``MEDFED_SITE_STATE_DIR``.

Each flow returns its report and also publishes it as a one-row table
artifact on its flow run, because the coordinator cannot read results that
the worker stores on the site's disk. A report contains only what may leave
a site: record counts, a dataset fingerprint (a hash), privacy spent,
upload receipts and aggregate evaluation metrics.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact

from medfed.contract.config import StudyConfig
from medfed.sites.runner import SiteRunner, connect_site

__all__ = [
    "REPORT_ARTIFACT_DESCRIPTION",
    "STATE_DIR_ENV",
    "prepare_site",
    "site_decrypt",
    "site_evaluation",
    "site_prepare",
    "site_round",
    "site_update",
]

logger = logging.getLogger(__name__)

STATE_DIR_ENV = "MEDFED_SITE_STATE_DIR"
DATA_DIR_ENV = "MEDFED_DATA_DIR"

#: Description of the table artifact that carries a site flow's report.
REPORT_ARTIFACT_DESCRIPTION = "medfed site report"


@flow(
    name="site_prepare",
    flow_run_name="{site_id}: prepare {config.study}",
    persist_result=False,
)
def site_prepare(config: StudyConfig, site_id: str) -> dict[str, Any]:
    """Preprocess the site's data and calibrate its DP noise; see ``prepare_site``."""
    return _publish(prepare_site(_runner(config, site_id)))


@flow(
    name="site_round",
    flow_run_name="{site_id}: {config.study} round {round_number}",
    persist_result=False,
)
def site_round(
    config: StudyConfig, site_id: str, round_number: int, aggregation_url: str
) -> dict[str, Any]:
    """Train one round on the site's data and upload the update.

    Returns the site's round report (``SiteRoundReport`` as a dict). A round
    that would exceed the site's privacy budget is rejected before training,
    with status ``rejected_budget`` in the report.
    """
    client, signer = connect_site(aggregation_url)
    runner = _runner(config, site_id)
    runner.signer = signer
    report = runner.train_round(client, round_number).to_dict()
    return _publish(report)


@flow(
    name="site_update",
    flow_run_name="{site_id}: {config.study} update {update_number}",
    persist_result=False,
)
def site_update(
    config: StudyConfig, site_id: str, update_number: int, aggregation_url: str
) -> dict[str, Any]:
    """Train one update of an asynchronous study on the latest global version.

    Returns the site's report (``SiteRoundReport`` as a dict), with the
    statuses of ``SiteRunner.train_asynchronous``.
    """
    client, signer = connect_site(aggregation_url)
    runner = _runner(config, site_id)
    runner.signer = signer
    report = runner.train_asynchronous(client, update_number).to_dict()
    return _publish(report)


@flow(
    name="site_decrypt",
    flow_run_name="{site_id}: {config.study} decrypt round {round_number}",
    persist_result=False,
)
def site_decrypt(
    config: StudyConfig, site_id: str, round_number: int, aggregation_url: str
) -> dict[str, Any]:
    """Decrypt a CKKS round's encrypted sum with the site's secret context.

    Returns the contributors, their total sample count and the bytes moved;
    the decrypted sum goes only to the aggregation service.
    """
    client, signer = connect_site(aggregation_url)
    runner = _runner(config, site_id)
    runner.signer = signer
    return _publish(runner.decrypt_sum(client, round_number))


@flow(
    name="site_evaluation",
    flow_run_name="{site_id}: {config.study} evaluate model {version}",
    persist_result=False,
)
def site_evaluation(
    config: StudyConfig,
    site_id: str,
    version: int,
    aggregation_url: str,
    split: Literal["test", "val"] = "test",
) -> dict[str, Any]:
    """Evaluate a global model version on one site split; report aggregates."""
    client, _ = connect_site(aggregation_url)
    report = vars(_runner(config, site_id).evaluate(client, version, split))
    return _publish(report)


def prepare_site(runner: SiteRunner) -> dict[str, Any]:
    """Preprocess a site's data, check the model fits it, calibrate DP noise.

    Returns the site's training record count, dataset fingerprint, DP
    parameters and the epsilon its ledger has spent so far: nothing about any
    single record.

    Raises:
        ConfigError: the study's model does not accept the site's records,
            so every round would fail at this site.
    """
    manifest = runner.prepare()
    runner.check_model_input()
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
        if ledger.label_count_noise is not None:
            privacy["label_count_noise"] = ledger.label_count_noise
    return {
        "train_records": records,
        "fingerprint": runner.dataset_fingerprint(),
        "privacy": privacy,
        # Apart from "privacy", which is logged as MLflow params that a
        # resumed run must not change.
        "epsilon_spent": ledger.epsilon_spent() if ledger is not None else None,
    }


def _runner(config: StudyConfig, site_id: str) -> SiteRunner:
    state_dir = Path(os.environ.get(STATE_DIR_ENV, ".medfed/site"))
    # The container's mount point wins over data.root, which names a folder
    # on the coordinator's machine.
    data_dir = os.environ.get(DATA_DIR_ENV)
    return SiteRunner(
        config, site_id, state_dir, data_root=Path(data_dir) if data_dir else None
    )


def _publish(report: dict[str, Any]) -> dict[str, Any]:
    # JSON keeps numpy scalars and nested lists exact and readable in the UI.
    encoded = json.loads(json.dumps(report, default=_to_builtin))
    create_table_artifact(
        table=[{"report": json.dumps(encoded, sort_keys=True)}],
        description=REPORT_ARTIFACT_DESCRIPTION,
    )
    return encoded


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} in a site report")
