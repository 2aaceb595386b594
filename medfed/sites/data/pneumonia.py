"""PneumoniaMNIST (MedMNIST v2): pediatric chest X-rays at 28 x 28, binary labels.

The file ``pneumoniamnist/pneumoniamnist.npz`` below the data root holds the
official train (4708), val (524) and test (624) splits as uint8 arrays;
label 1 is pneumonia. It is read with ``allow_pickle=False``.

Federated layout. The official training split is partitioned across the
sites. Each site then holds out a stratified ``val_fraction`` of its own
partition as its validation split, because a hospital can only validate on
its own data and its validation set should follow its own label mix. The
official val split is not given to any site.

The official test split is evaluated in one of two ways. The coordinator can
hold it whole (``preprocess_pneumonia_test``). Or each site receives a
disjoint IID share of it as its ``test`` split (``include_test``), so metrics
pooled over all sites are metrics on the whole official test split; the
shares carry no scanner profile, because the test images stand for the
reference scanner every global model is measured on.
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medfed.errors import ConfigError, DataError
from medfed.sites.data.feature_skew import scanner_profile
from medfed.sites.data.imaging import write_image_splits
from medfed.sites.data.partition import get_partitioner
from medfed.sites.data.root import DatasetFile, file_sha256, verified_file

__all__ = [
    "PNEUMONIA_FILE",
    "SPLITS",
    "load_pneumoniamnist",
    "preprocess_pneumonia_site",
    "preprocess_pneumonia_test",
    "stratified_holdout",
]

logger = logging.getLogger(__name__)

PNEUMONIA_FILE = DatasetFile(
    "pneumoniamnist",
    "pneumoniamnist.npz",
    "d0bfa3330f26554c4117328b1117f52bfb3746404b0594c58f37a09b4314d396",
    "https://zenodo.org/records/10519652/files/pneumoniamnist.npz",
)
SPLITS = ("train", "val", "test")
IMAGE_SHAPE = (28, 28)


def load_pneumoniamnist(
    data_root: Path, *, download: bool | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{split: (images, labels)}`` of the three official splits.

    Images are uint8 of shape (n, 28, 28); labels are int64 of shape (n,).
    ``download`` is passed to ``verified_file``: None downloads a missing file
    only into the download cache.

    Raises:
        DataError: the file is missing and cannot be downloaded, its SHA-256
            differs from the published one, or an array is malformed.
    """
    path = verified_file(data_root, PNEUMONIA_FILE, download=download)
    splits = {}
    with np.load(path, allow_pickle=False) as archive:
        for split in SPLITS:
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"].reshape(-1).astype(np.int64)
            if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
                raise DataError(
                    f"{path}: {split}_images must be uint8 of shape (n, 28, 28), got "
                    f"{images.dtype} {images.shape}"
                )
            if len(labels) != len(images) or not np.isin(labels, (0, 1)).all():
                raise DataError(
                    f"{path}: {split}_labels must hold one 0/1 label per image"
                )
            splits[split] = (images, labels)
    logger.info(
        "loaded PneumoniaMNIST: %s",
        ", ".join(f"{split} {len(splits[split][1])}" for split in SPLITS),
    )
    return splits


def stratified_holdout(
    labels: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..n-1 into (kept, held out), holding out ``fraction`` per class.

    Every class with at least two samples keeps one and holds out at least
    one, so a validation split sees both labels whenever the site has both.

    Raises:
        ConfigError: ``fraction`` is outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        if len(members) < 2:
            continue
        count = min(max(1, round(fraction * len(members))), len(members) - 1)
        held.append(members[:count])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def preprocess_pneumonia_site(
    data_root: Path,
    out_dir: Path,
    *,
    site_index: int,
    sites: int,
    seed: int,
    partition: str = "iid",
    partition_params: Mapping[str, Any] | None = None,
    min_samples: int = 50,
    val_fraction: float = 0.1,
    feature_skew: float = 0.0,
    normalization: str = "scale",
    include_test: bool = False,
) -> dict[str, Any]:
    """Preprocess site ``site_index``'s share of PneumoniaMNIST into ``out_dir``.

    Writes ``train.parquet``, ``val.parquet``, with ``include_test`` also
    ``test.parquet``, and ``manifest.json`` (see
    ``imaging.write_image_splits``); returns the manifest.

    Args:
        data_root: folder holding ``pneumoniamnist/pneumoniamnist.npz``.
        out_dir: the site's preprocessed-data folder.
        site_index: position of this site among the study's sites, from 0.
        sites: number of sites in the study.
        seed: study data seed; the partition, the holdout and the scanner
            profile all derive from it, so every site computes the same
            partition independently.
        partition: partitioner name (``iid``, ``label_skew``, ``quantity_skew``).
        partition_params: the partitioner's keyword arguments.
        min_samples: fewest training-pool samples a site may receive.
        val_fraction: share of the site's partition held out for validation.
        feature_skew: scanner-profile strength in [0, 1]; 0 disables it.
        normalization: ``"scale"`` or ``"standardize"``.
        include_test: also write this site's IID share of the official test
            split, without the scanner profile.

    Raises:
        ConfigError: a parameter is out of range.
        DataError: the dataset is missing or altered, or the partition fails.
    """
    if not 0 <= site_index < sites:
        raise ConfigError(f"site_index must be in [0, {sites}), got {site_index}")
    data = load_pneumoniamnist(data_root)
    images, labels = data["train"]
    partitioner = get_partitioner(partition, **dict(partition_params or {}))
    parts = partitioner.split(labels, sites=sites, seed=seed, min_samples=min_samples)
    own = parts[site_index]
    kept, held_out = stratified_holdout(
        labels[own], fraction=val_fraction, seed=seed + 1 + site_index
    )
    profile = scanner_profile(site_index=site_index, seed=seed, strength=feature_skew)
    splits = {
        "train": (images[own[kept]], labels[own[kept]]),
        "val": (images[own[held_out]], labels[own[held_out]]),
    }
    if include_test:
        test_images, test_labels = data["test"]
        shares = get_partitioner("iid").split(test_labels, sites=sites, seed=seed)
        share = shares[site_index]
        splits["test"] = (test_images[share], test_labels[share])
    parameters = {
        "dataset": "pneumoniamnist",
        "source_sha256": PNEUMONIA_FILE.sha256,
        "source_split": "train",
        "site_index": site_index,
        "sites": sites,
        "seed": seed,
        "partition": partition,
        "partition_params": partitioner.params(),
        "min_samples": min_samples,
        "val_fraction": val_fraction,
        "feature_skew": feature_skew,
        "include_test": include_test,
    }
    return write_image_splits(
        out_dir,
        splits,
        normalization=normalization,
        profile=profile,
        unprofiled=("test",),
        parameters=parameters,
    )


def preprocess_pneumonia_test(data_root: Path, out_dir: Path) -> dict[str, Any]:
    """Write the official test split for the coordinator's evaluation.

    The test images are scaled to [0, 1] with no scanner profile. Writes
    ``test.parquet`` and ``manifest.json`` into ``out_dir``.

    Raises:
        DataError: the dataset is missing or altered.
    """
    path = verified_file(data_root, PNEUMONIA_FILE)
    data = load_pneumoniamnist(data_root)
    return write_image_splits(
        out_dir,
        {"test": data["test"]},
        parameters={
            "dataset": "pneumoniamnist",
            "source_sha256": file_sha256(path),
            "source_split": "test",
        },
    )
