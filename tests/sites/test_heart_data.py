import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medfed.errors import DataError
from medfed.sites.data.heart import (
    FEATURES,
    HEART_FILES,
    load_site_dataset,
    preprocess_heart_site,
)

EXPECTED_RECORDS = {
    "processed.cleveland.data": 303,
    "processed.hungarian.data": 261,
    "processed.switzerland.data": 46,
    "processed.va.data": 130,
}


@pytest.mark.parametrize("source", sorted(EXPECTED_RECORDS))
def test_record_counts_after_preprocessing(
    data_root: Path, tmp_path: Path, source: str
) -> None:
    manifest = preprocess_heart_site(
        data_root, source, tmp_path, test_fraction=0.34, seed=42
    )

    splits = manifest["splits"]
    assert isinstance(splits, dict)
    assert splits["train"]["rows"] + splits["test"]["rows"] == EXPECTED_RECORDS[source]
    assert splits["train"]["rows"] == round(EXPECTED_RECORDS[source] * 0.66)
    assert manifest["source_sha256"] == HEART_FILES[source].sha256


def test_parquet_round_trip_and_standardization(
    data_root: Path, tmp_path: Path
) -> None:
    preprocess_heart_site(
        data_root, "processed.cleveland.data", tmp_path, test_fraction=0.34, seed=42
    )

    train = load_site_dataset(tmp_path, "train")
    schema = pq.read_schema(tmp_path / "train.parquet")

    assert train.features.shape == (200, len(FEATURES))
    assert set(np.unique(train.labels)) == {0.0, 1.0}
    assert json.loads(schema.metadata[b"features"]) == FEATURES
    # Standardized with the site's own training statistics.
    np.testing.assert_allclose(train.features.mean(axis=0), 0.0, atol=1e-5)


def test_split_is_reproducible(data_root: Path, tmp_path: Path) -> None:
    first = preprocess_heart_site(
        data_root, "processed.va.data", tmp_path / "a", test_fraction=0.34, seed=7
    )
    second = preprocess_heart_site(
        data_root, "processed.va.data", tmp_path / "b", test_fraction=0.34, seed=7
    )
    other = preprocess_heart_site(
        data_root, "processed.va.data", tmp_path / "c", test_fraction=0.34, seed=8
    )

    assert first["splits"] == second["splits"]
    assert first["splits"] != other["splits"]


def test_altered_file_is_rejected(tmp_path: Path, data_root: Path) -> None:
    folder = tmp_path / "heart-disease"
    folder.mkdir()
    original = (data_root / "heart-disease" / "processed.va.data").read_bytes()
    (folder / "processed.va.data").write_bytes(original.replace(b"63", b"64", 1))

    with pytest.raises(DataError, match=r"has SHA-256 .* expected e7c93d8d"):
        preprocess_heart_site(
            tmp_path, "processed.va.data", tmp_path / "out", test_fraction=0.34, seed=42
        )
    assert not (tmp_path / "out").exists()


def test_unknown_source_is_rejected(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(
        DataError, match=r"unknown heart-disease source 'nowhere\.data'"
    ):
        preprocess_heart_site(
            data_root, "nowhere.data", tmp_path, test_fraction=0.34, seed=42
        )
