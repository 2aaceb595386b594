"""Dataset adapters: how a site prepares and reads its data, by dataset name.

``prepare_site_data`` turns the site's raw data into Parquet splits with a
manifest, once; ``load_split`` reads a split back as tensors for training and
evaluation. ``check_site_source`` checks the raw data file before a study
starts.
"""

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from medfed.contract.config import StudyConfig
from medfed.errors import ConfigError, DataError
from medfed.sites.data.root import DatasetFile, is_download_cache, verified_file

__all__ = ["check_site_source", "load_split", "prepare_site_data"]


def prepare_site_data(
    config: StudyConfig, site_id: str, data_root: Path, out_dir: Path
) -> dict[str, Any]:
    """Preprocess ``site_id``'s data into ``out_dir``; return the manifest."""
    if config.data.dataset == "heart_disease":
        from medfed.sites.data.heart import preprocess_heart_site

        return preprocess_heart_site(
            data_root,
            _heart_source(config, site_id),
            out_dir,
            test_fraction=config.data.test_fraction,
            seed=config.data.seed,
        )
    if config.data.dataset == "pneumoniamnist":
        from medfed.sites.data.pneumonia import preprocess_pneumonia_site

        data = config.data
        return preprocess_pneumonia_site(
            data_root,
            out_dir,
            site_index=[s.id for s in config.sites].index(site_id),
            sites=len(config.sites),
            seed=data.seed,
            partition=data.partition.name,
            partition_params=data.partition.params,
            min_samples=data.partition.min_samples,
            val_fraction=data.val_fraction,
            feature_skew=data.feature_skew,
            normalization=data.normalization,
            include_test=True,
        )
    raise DataError(f"dataset {config.data.dataset!r} has no site preprocessing yet")


def check_site_source(config: StudyConfig, site_id: str, data_root: Path) -> None:
    """Check that ``site_id``'s raw data file is in ``data_root``, unaltered.

    A file absent from the download cache passes, because preprocessing
    downloads it there.

    Raises:
        ConfigError: a heart-disease site has no ``source``.
        DataError: the file is missing from a configured data root, or its
            SHA-256 differs from the published one.
    """
    spec = _source_file(config, site_id)
    path = data_root / spec.folder / spec.name
    if path.exists() or not is_download_cache(data_root):
        verified_file(data_root, spec, download=False)


def _source_file(config: StudyConfig, site_id: str) -> DatasetFile:
    if config.data.dataset == "heart_disease":
        from medfed.sites.data.heart import HEART_FILES

        source = _heart_source(config, site_id)
        if source not in HEART_FILES:
            raise DataError(
                f"unknown heart-disease source {source!r}; expected one of "
                f"{', '.join(sorted(HEART_FILES))}"
            )
        return HEART_FILES[source]
    if config.data.dataset == "pneumoniamnist":
        from medfed.sites.data.pneumonia import PNEUMONIA_FILE

        return PNEUMONIA_FILE
    raise DataError(f"dataset {config.data.dataset!r} has no site preprocessing yet")


def _heart_source(config: StudyConfig, site_id: str) -> str:
    site = next(s for s in config.sites if s.id == site_id)
    if site.source is None:
        raise ConfigError(
            f"site {site_id!r} has no 'source'; name its heart-disease file, "
            "e.g. processed.cleveland.data"
        )
    return site.source


def load_split(
    config: StudyConfig, site_dir: Path, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a preprocessed split as (inputs, labels) tensors.

    Splits are cached per file version, so a site reads its Parquet once per
    study rather than once per round. Callers must not modify the tensors.
    """
    path = site_dir / f"{split}.parquet"
    if not path.exists():
        raise DataError(
            f"preprocessed split {path} not found; preprocess the site first"
        )
    stat = path.stat()
    return _load_split_cached(config.data.dataset, path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _load_split_cached(
    dataset: str, path: Path, mtime_ns: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "heart_disease":
        from medfed.sites.data.heart import load_site_dataset

        loaded = load_site_dataset(path.parent, path.stem)
        return torch.from_numpy(loaded.features.copy()), torch.from_numpy(
            loaded.labels.copy()
        )
    if dataset == "pneumoniamnist":
        from medfed.sites.data.imaging import load_image_split

        return load_image_split(path.parent, path.stem)
    raise DataError(f"dataset {dataset!r} has no loader yet")
