"""Site preprocessing of 2D images: intensity transforms, Parquet splits, manifest.

A site's images pass through, in order: the site's scanner profile (feature
skew, ``feature_skew.py``), MONAI's ``ScaleIntensityRange`` from the uint8
range to [0, 1], and optionally MONAI's ``NormalizeIntensity`` with the site's
own training mean and standard deviation. Random augmentation is not applied
here; it runs on each training batch (``augment.py``), so the stored splits
are deterministic.

Each split is written as Parquet with two columns, ``image`` (fixed-size list
of float32, row-major height x width) and ``label`` (int8), with the image
shape in the schema metadata. ``manifest.json`` records per split the row
count, the label counts, the file's SHA-256 and a content SHA-256 over the
decoded labels and pixels (stable across Parquet writer versions), plus every
parameter that produced the data. Readers check each file against the
manifest before use.
"""

import hashlib
import json
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from monai.transforms import NormalizeIntensity, ScaleIntensityRange

from medfed.errors import ConfigError, DataError
from medfed.sites.data.feature_skew import ScannerProfile, apply_scanner_profile
from medfed.sites.data.root import file_sha256

__all__ = [
    "NORMALIZATIONS",
    "content_sha256",
    "load_image_split",
    "read_image_parquet",
    "scale_to_unit",
    "write_image_parquet",
    "write_image_splits",
]

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("scale", "standardize")
MANIFEST = "manifest.json"


def scale_to_unit(images: np.ndarray) -> np.ndarray:
    """Map uint8 intensities 0..255 linearly to float32 [0, 1] with MONAI."""
    scale = ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(images.astype(np.float32)), dtype=np.float32)


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """Hash a split's pixels (float32) and labels (int8), independent of file format."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(labels, dtype=np.int8).tobytes())
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    return digest.hexdigest()


def write_image_parquet(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write float32 images (n, H, W) and 0/1 labels (n,) to ``path`` atomically."""
    height, width = images.shape[1:]
    pixels = pa.FixedSizeListArray.from_arrays(
        pa.array(images.astype(np.float32).reshape(-1), pa.float32()), height * width
    )
    schema = pa.schema(
        [
            pa.field("image", pa.list_(pa.float32(), height * width)),
            pa.field("label", pa.int8()),
        ],
        metadata={"image_shape": json.dumps([height, width])},
    )
    table = pa.Table.from_arrays(
        [pixels, pa.array(labels.astype(np.int8), pa.int8())], schema=schema
    )
    temporary = path.with_suffix(".parquet.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def read_image_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 images (n, H, W) and int64 labels (n,) from ``path``.

    Raises:
        DataError: the file is missing or lacks the expected columns or shape.
    """
    if not path.exists():
        raise DataError(
            f"preprocessed split {path} not found; preprocess the site first"
        )
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    if {"image", "label"} - set(table.column_names) or b"image_shape" not in metadata:
        raise DataError(
            f"{path} is not an image split: it needs 'image' and 'label' columns "
            "and 'image_shape' metadata"
        )
    height, width = json.loads(metadata[b"image_shape"])
    pixels = table.column("image").combine_chunks().flatten().to_numpy()
    labels = table.column("label").to_numpy().astype(np.int64)
    images = np.array(pixels, np.float32).reshape(len(labels), height, width)
    return images, labels


def write_image_splits(
    out_dir: Path,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    normalization: str = "scale",
    profile: ScannerProfile | None = None,
    unprofiled: Collection[str] = (),
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Preprocess uint8 splits, write them as Parquet and return the manifest.

    Args:
        out_dir: folder that receives ``<split>.parquet`` and ``manifest.json``.
        splits: ``{split: (uint8 images (n, H, W), 0/1 labels (n,))}``; when
            ``normalization`` is ``"standardize"`` it must contain ``"train"``,
            whose mean and standard deviation are applied to every split.
        normalization: ``"scale"`` ([0, 1]) or ``"standardize"``.
        profile: the site's scanner profile, applied after scaling.
        unprofiled: splits that skip ``profile`` (a shared test split).
        parameters: how the splits were made (partition, seed, source hash),
            copied into the manifest.

    Raises:
        ConfigError: ``normalization`` is unknown, or ``"standardize"`` was
            requested without a train split.
        DataError: a split is empty or its arrays disagree in length.
    """
    if normalization not in NORMALIZATIONS:
        raise ConfigError(
            f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
            f"got {normalization!r}"
        )
    scaled = {}
    for split, (images, labels) in splits.items():
        if len(images) == 0 or len(images) != len(labels):
            raise DataError(
                f"split {split!r} has {len(images)} images and {len(labels)} labels; "
                "it needs at least one image and one label per image"
            )
        unit = scale_to_unit(images)
        if profile is not None and split not in unprofiled:
            unit = apply_scanner_profile(unit, profile)
        scaled[split] = (unit, np.asarray(labels).reshape(-1))

    statistics: dict[str, float] = {}
    if normalization == "standardize":
        if "train" not in scaled:
            raise ConfigError("normalization 'standardize' needs a 'train' split")
        mean = float(scaled["train"][0].mean())
        std = float(scaled["train"][0].std()) or 1.0
        statistics = {"mean": mean, "std": std}
        normalize = NormalizeIntensity(
            subtrahend=np.array(mean, np.float32), divisor=np.array(std, np.float32)
        )
        scaled = {
            split: (np.asarray(normalize(images), np.float32), labels)
            for split, (images, labels) in scaled.items()
        }

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_splits = {}
    for split, (images, labels) in scaled.items():
        path = out_dir / f"{split}.parquet"
        write_image_parquet(path, images, labels)
        manifest_splits[split] = {
            "rows": len(labels),
            "label_counts": {
                str(value): int((labels == value).sum()) for value in (0, 1)
            },
            "sha256": file_sha256(path),
            "content_sha256": content_sha256(images, labels),
        }
    manifest: dict[str, Any] = {
        "image_shape": list(next(iter(scaled.values()))[0].shape[1:]),
        "normalization": normalization,
        "normalization_statistics": statistics,
        "scanner_profile": (profile or ScannerProfile()).as_dict(),
        "parameters": dict(parameters or {}),
        "splits": manifest_splits,
    }
    _write_json_atomically(out_dir / MANIFEST, manifest)
    logger.info(
        "wrote image splits to %s: %s",
        out_dir,
        ", ".join(f"{split} {info['rows']}" for split, info in manifest_splits.items()),
    )
    return manifest


def load_image_split(site_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a preprocessed split as images (n, 1, H, W) float32 and labels (n,) float32.

    Raises:
        DataError: the manifest or the split is missing, or the file's
            SHA-256 differs from the manifest (the data changed after
            preprocessing).
    """
    manifest_path = site_dir / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"{manifest_path} not found; preprocess the site first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if split not in manifest["splits"]:
        raise DataError(
            f"split {split!r} not found in {manifest_path}; available: "
            f"{', '.join(sorted(manifest['splits']))}"
        )
    path = site_dir / f"{split}.parquet"
    expected = manifest["splits"][split]["sha256"]
    if path.exists() and file_sha256(path) != expected:
        raise DataError(
            f"{path} does not match the SHA-256 in {manifest_path}; "
            "preprocess the site again"
        )
    images, labels = read_image_parquet(path)
    return (
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.float32)),
    )


def _write_json_atomically(path: Path, value: object) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
