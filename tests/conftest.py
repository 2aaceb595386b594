"""Shared fixtures: real Prefect, MLflow and aggregation-service instances, and data.

Prefect runs on a temporary ephemeral API (``prefect_test_harness``), MLflow on
an SQLite file in a session folder, and the aggregation service as a uvicorn
process on 127.0.0.1. Nothing here is mocked.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medfed.cli import configure_environment
from medfed.sites.data.pneumonia import PNEUMONIA_FILE
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


@pytest.fixture(scope="session")
def pneumonia_root() -> Path:
    """The data root holding the real PneumoniaMNIST file; skip when absent."""
    root = resolve_data_root(None)
    if not (root / PNEUMONIA_FILE.folder / PNEUMONIA_FILE.name).exists():
        pytest.skip(f"PneumoniaMNIST not found under {root}; set MEDFED_DATA_DIR")
    return root


@pytest.fixture(scope="session")
def xray_arrays(pneumonia_root) -> tuple[np.ndarray, np.ndarray]:
    """Twelve real chest X-rays (uint8, 28 x 28) with both labels present."""
    with np.load(
        pneumonia_root / PNEUMONIA_FILE.folder / PNEUMONIA_FILE.name,
        allow_pickle=False,
    ) as archive:
        labels = archive["test_labels"].reshape(-1)
        chosen = np.concatenate(
            [np.flatnonzero(labels == 0)[:6], np.flatnonzero(labels == 1)[:6]]
        )
        return archive["test_images"][chosen], labels[chosen].astype(np.int64)
