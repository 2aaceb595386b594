"""Shared fixtures: the real PneumoniaMNIST file and a few of its X-rays."""

from pathlib import Path

import numpy as np
import pytest

from medfed.sites.data.pneumonia import PNEUMONIA_FILE
from medfed.sites.data.root import resolve_data_root


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
