"""The ``preprocess_site`` Prefect flow: prepare one site's imaging data.

The flow runs at the site (in its work pool, or in-process in local mode).
It reads the site's raw data, writes the Parquet splits and the manifest into
the site's folder and returns the manifest, which holds counts, hashes and
parameters but no pixel or label of any patient.
"""

import logging
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from medfed.errors import ConfigError
from medfed.sites.data.image_folder import preprocess_folder_site
from medfed.sites.data.pneumonia import preprocess_pneumonia_site
from medfed.sites.data.root import resolve_data_root

__all__ = ["preprocess_site"]

logger = logging.getLogger(__name__)


@task(name="preprocess_pneumoniamnist", cache_policy=NONE, persist_result=False)
def _pneumonia_task(
    data_root: str | None, out_dir: str, options: dict[str, Any]
) -> dict[str, Any]:
    return preprocess_pneumonia_site(
        resolve_data_root(data_root), Path(out_dir), **options
    )


@task(name="preprocess_image_folder", cache_policy=NONE, persist_result=False)
def _folder_task(
    folder: str, labels_csv: str, out_dir: str, options: dict[str, Any]
) -> dict[str, Any]:
    return preprocess_folder_site(
        Path(folder), Path(labels_csv), Path(out_dir), **options
    )


@flow(name="preprocess_site", flow_run_name="preprocess {site_id}")
def preprocess_site(
    site_id: str,
    out_dir: str,
    *,
    dataset: str = "pneumoniamnist",
    data_root: str | None = None,
    folder: str | None = None,
    labels_csv: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Preprocess ``site_id``'s data into ``out_dir`` and return its manifest.

    Args:
        site_id: the site's identifier, used in the run name and the log.
        out_dir: the site's preprocessed-data folder.
        dataset: ``"pneumoniamnist"`` (a share of the public dataset, for
            benchmarks) or ``"image_folder"`` (the site's own images).
        data_root: data root for ``pneumoniamnist``; resolved as in
            ``medfed.sites.data.root`` when None.
        folder: the image folder for ``image_folder``.
        labels_csv: the labels CSV for ``image_folder``; defaults to
            ``labels.csv`` inside ``folder``.
        options: keyword arguments of ``preprocess_pneumonia_site`` or
            ``preprocess_folder_site`` (partition, seed, feature skew, ...).

    Raises:
        ConfigError: the dataset name or an option is invalid.
        DataError: the data is missing, altered or has invalid files.
    """
    options = dict(options or {})
    if dataset == "pneumoniamnist":
        manifest = _pneumonia_task(data_root, out_dir, options)
    elif dataset == "image_folder":
        if folder is None:
            raise ConfigError("dataset 'image_folder' needs 'folder', got None")
        csv_path = labels_csv or str(Path(folder) / "labels.csv")
        manifest = _folder_task(folder, csv_path, out_dir, options)
    else:
        raise ConfigError(
            f"unknown dataset {dataset!r}; expected 'pneumoniamnist' or 'image_folder'"
        )
    logger.info(
        "site %s preprocessed: %s",
        site_id,
        ", ".join(f"{s} {info['rows']}" for s, info in manifest["splits"].items()),
    )
    return manifest
