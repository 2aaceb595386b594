"""Dataset adapters: how a site prepares and reads its data, by dataset name.

``prepare_site_data`` turns the site's raw data into Parquet splits with a
manifest, once; ``load_split`` reads a split back as tensors for training and
evaluation.
"""

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from medfed.contract.config import StudyConfig
from medfed.errors import ConfigError, DataError

__all__ = ["load_split", "prepare_site_data"]


def prepare_site_data(
    config: StudyConfig, site_id: str, data_root: Path, out_dir: Path
) -> dict[str, Any]:
    """Preprocess ``site_id``'s data into ``out_dir``; return the manifest."""
    site = next(s for s in config.sites if s.id == site_id)
    if config.data.dataset == "heart_disease":
        from medfed.sites.data.heart import preprocess_heart_site

        if site.source is None:
            raise ConfigError(
                f"site {site_id!r} has no 'source'; name its heart-disease file, "
                "e.g. processed.cleveland.data"
            )
        return preprocess_heart_site(
            data_root,
            site.source,
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
