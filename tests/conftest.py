"""Shared fixtures: real Prefect, MLflow and aggregation-service instances.

Prefect runs on a temporary ephemeral API (``prefect_test_harness``), MLflow on
an SQLite file in a session folder, and the aggregation service as a uvicorn
process on 127.0.0.1. Nothing here is mocked.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from medfed.cli import configure_environment
from medfed.sites.data.root import resolve_data_root

configure_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = resolve_data_root()
    if not (root / "heart-disease" / "processed.cleveland.data").exists():
        pytest.fail(
            f"heart-disease data not found under {root}; set MEDFED_DATA_DIR to the "
            "folder that contains heart-disease/"
        )
    return root


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
