"""Preprocessing of one UCI heart-disease hospital file, following FLamby.

Recipe (Fed-Heart-Disease in FLamby, Terrail et al., 2022): binary target
``num > 0``; drop the columns slope, ca and thal; drop rows that still have a
missing value; one-hot encode cp and restecg over their documented categories
(so every site has the same columns); split 66/34 into train and test with a
fixed seed; standardize with the site's own training mean and standard
deviation. The result is written as Parquet with a JSON manifest.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from medfed.errors import DataError
from medfed.sites.data.root import DatasetFile, file_sha256, verified_file

__all__ = [
    "FEATURES",
    "HEART_FILES",
    "SiteDataset",
    "load_site_dataset",
    "preprocess_heart_site",
]

logger = logging.getLogger(__name__)

_COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
_NUMERIC = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"]
_CATEGORIES = {"cp": [1, 2, 3, 4], "restecg": [0, 1, 2]}
FEATURES = _NUMERIC + [
    f"{column}_{value}" for column, values in _CATEGORIES.items() for value in values
]

_UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease"
HEART_FILES = {
    spec.name: spec
    for spec in (
        DatasetFile("heart-disease", "processed.cleveland.data",
                    "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
                    f"{_UCI}/processed.cleveland.data"),
        DatasetFile("heart-disease", "processed.hungarian.data",
                    "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
                    f"{_UCI}/processed.hungarian.data"),
        DatasetFile("heart-disease", "processed.switzerland.data",
                    "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
                    f"{_UCI}/processed.switzerland.data"),
        DatasetFile("heart-disease", "processed.va.data",
                    "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
                    f"{_UCI}/processed.va.data"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class SiteDataset:
    """A site's preprocessed split, read back from Parquet."""

    features: np.ndarray  # (records, features), float32
    labels: np.ndarray  # (records,), float32 in {0, 1}

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def preprocess_heart_site(
    data_root: Path, source: str, out_dir: Path, *, test_fraction: float, seed: int
) -> dict[str, object]:
    """Preprocess one hospital file into ``out_dir``; return its manifest.

    Writes ``train.parquet``, ``test.parquet`` and ``manifest.json``.

    Raises:
        DataError: the file is unknown, missing, altered or malformed.
    """
    if source not in HEART_FILES:
        raise DataError(
            f"unknown heart-disease source {source!r}; expected one of "
            f"{', '.join(sorted(HEART_FILES))}"
        )
    path = verified_file(data_root, HEART_FILES[source])
    features, labels, dropped = _read_heart_file(path)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    train_count = round(len(labels) * (1 - test_fraction))
    train_index, test_index = order[:train_count], order[train_count:]

    mean = features[train_index].mean(axis=0)
    std = features[train_index].std(axis=0)
    # A constant training column (e.g. fbs at a small site) keeps its values
    # centred instead of dividing by zero.
    std = np.where(std > 0, std, 1.0)
    standardized = ((features - mean) / std).astype(np.float32)

    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": train_index, "test": test_index}
    for split, index in splits.items():
        _write_parquet(out_dir / f"{split}.parquet", standardized[index], labels[index])
    manifest: dict[str, object] = {
        "dataset": "heart_disease",
        "source_file": source,
        "source_sha256": file_sha256(path),
        "rows_dropped_missing": dropped,
        "features": FEATURES,
        "seed": seed,
        "test_fraction": test_fraction,
        "splits": {
            split: {
                "rows": len(index),
                "label_counts": {
                    "0": int((labels[index] == 0).sum()),
                    "1": int((labels[index] == 1).sum()),
                },
                "sha256": file_sha256(out_dir / f"{split}.parquet"),
            }
            for split, index in splits.items()
        },
    }
    _write_json_atomically(out_dir / "manifest.json", manifest)
    logger.info("preprocessed %s: %d records", source, len(labels))
    return manifest


def load_site_dataset(site_dir: Path, split: str) -> SiteDataset:
    """Read a preprocessed split back from ``site_dir``.

    Raises:
        DataError: the split is missing or has an unexpected schema.
    """
    path = site_dir / f"{split}.parquet"
    if not path.exists():
        raise DataError(
            f"preprocessed split {path} not found; preprocess the site first"
        )
    table = pq.read_table(path)
    if "label" not in table.column_names or "features" not in table.column_names:
        raise DataError(f"{path} lacks the 'features' or 'label' column")
    features = np.asarray(
        table.column("features").combine_chunks().flatten(), np.float32
    )
    labels = np.asarray(table.column("label"), np.float32)
    return SiteDataset(features=features.reshape(len(labels), -1), labels=labels)


def _read_heart_file(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        table = pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(column_names=_COLUMNS),
            convert_options=pa_csv.ConvertOptions(
                null_values=["?"],
                column_types={name: pa.float64() for name in _COLUMNS},
            ),
        )
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(
            f"cannot parse {path} as UCI heart-disease CSV: {error}"
        ) from None

    table = table.drop_columns(["slope", "ca", "thal"])
    complete = table.drop_null()
    dropped = table.num_rows - complete.num_rows
    columns = {name: complete.column(name).to_numpy() for name in complete.column_names}

    encoded = [columns[name] for name in _NUMERIC]
    for name, categories in _CATEGORIES.items():
        unknown = set(np.unique(columns[name])) - set(categories)
        if unknown:
            raise DataError(
                f"{path}: column {name} has unexpected values {sorted(unknown)}"
            )
        encoded.extend(
            (columns[name] == value).astype(np.float64) for value in categories
        )
    features = np.stack(encoded, axis=1)
    labels = (columns["num"] > 0).astype(np.float32)
    return features, labels, dropped


def _write_parquet(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    width = features.shape[1]
    feature_column = pa.FixedSizeListArray.from_arrays(
        pa.array(features.reshape(-1), pa.float32()), width
    )
    schema = pa.schema(
        [
            pa.field("features", pa.list_(pa.float32(), width)),
            pa.field("label", pa.float32()),
        ],
        metadata={"features": json.dumps(FEATURES)},
    )
    table = pa.Table.from_arrays(
        [feature_column, pa.array(labels, pa.float32())], schema=schema
    )
    temporary = path.with_suffix(".parquet.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def _write_json_atomically(path: Path, value: object) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
