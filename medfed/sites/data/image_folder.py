"""A site's own images: a folder of DICOM, NIfTI or PNG files and a labels CSV.

The CSV has a header row ``filename,label`` and one row per image; a file
name is relative to the folder and a label is 0 or 1. Files are read with
MONAI's ``LoadImage`` (pydicom for ``.dcm``/``.dicom``, nibabel for
``.nii``/``.nii.gz``, Pillow for ``.png``).

The whole folder is checked before anything is written: unreadable files,
images without a label, labels for files that do not exist, duplicate or
invalid labels, and images that are not single-channel of the expected size.
All problems are collected and raised as one ``DataError`` that lists the
first ``max_listed`` of them with their file names, so a study never starts
on a partly broken dataset.
"""

import csv
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import LoadImage, ScaleIntensity
from pydicom.errors import InvalidDicomError

from medfed.errors import DataError
from medfed.sites.data.imaging import write_image_splits
from medfed.sites.data.pneumonia import stratified_holdout

__all__ = ["READERS", "FolderDataset", "preprocess_folder_site", "read_image_folder"]

logger = logging.getLogger(__name__)

#: MONAI reader per file suffix.
READERS = {
    ".dcm": "PydicomReader",
    ".dicom": "PydicomReader",
    ".nii": "NibabelReader",
    ".nii.gz": "NibabelReader",
    ".png": "PILReader",
}

_READ_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    TypeError,
    EOFError,
    InvalidDicomError,
)


@dataclass(frozen=True)
class FolderDataset:
    """Images of a folder, min-max scaled per image to uint8, with their labels."""

    images: np.ndarray  # (n, H, W) uint8
    labels: np.ndarray  # (n,) int64 in {0, 1}
    filenames: list[str]


def _suffix(name: str) -> str:
    lowered = name.lower()
    return ".nii.gz" if lowered.endswith(".nii.gz") else Path(lowered).suffix


def _read_labels(labels_csv: Path, problems: list[str]) -> dict[str, int]:
    labels: dict[str, int] = {}
    try:
        with labels_csv.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or {"filename", "label"} - set(
                reader.fieldnames
            ):
                problems.append(
                    f"{labels_csv.name}: the header must be 'filename,label', got "
                    f"{','.join(reader.fieldnames or [])!r}"
                )
                return labels
            for line, row in enumerate(reader, start=2):
                name = (row["filename"] or "").strip()
                value = (row["label"] or "").strip()
                if name in labels:
                    problems.append(f"{name}: labelled twice (line {line})")
                elif value not in ("0", "1"):
                    problems.append(
                        f"{name}: invalid label {value!r} on line {line}; "
                        "expected 0 or 1"
                    )
                else:
                    labels[name] = int(value)
    except FileNotFoundError:
        problems.append(f"{labels_csv}: labels file not found")
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        problems.append(f"{labels_csv.name}: cannot read labels ({error})")
    return labels


def _load_image(
    path: Path, image_size: tuple[int, int], problems: list[str]
) -> np.ndarray | None:
    """Return the image as (rows, columns) float32, or None after noting a problem."""
    loader = LoadImage(reader=READERS[_suffix(path.name)], image_only=True)
    try:
        with warnings.catch_warnings():
            # Secondary-capture DICOM has no patient orientation, which only
            # matters for the affine that is not used here.
            warnings.filterwarnings("ignore", message=".*ImageOrientationPatient")
            # Without a GPU decoder MONAI falls back to pydicom's own, as intended.
            warnings.filterwarnings("ignore", message=".*nvImageCodec")
            image = np.asarray(loader(str(path)), dtype=np.float32)
    except _READ_ERRORS as error:
        summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
        problems.append(f"{path.name}: unreadable ({type(error).__name__}: {summary})")
        return None
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        problems.append(
            f"{path.name}: expected a single-channel 2D image, got shape "
            f"{tuple(image.shape)}"
        )
        return None
    # MONAI returns spatial axes in (x, y) order for every reader; the
    # pipeline stores (row, column).
    image = image.T
    if tuple(image.shape) != image_size:
        problems.append(
            f"{path.name}: image size {image.shape[0]}x{image.shape[1]}, expected "
            f"{image_size[0]}x{image_size[1]}"
        )
        return None
    return image


def read_image_folder(
    folder: Path,
    labels_csv: Path,
    *,
    image_size: tuple[int, int] = (28, 28),
    max_listed: int = 20,
) -> FolderDataset:
    """Read and check every labelled image of ``folder``.

    Each image is min-max scaled to 0..255 on its own, because bit depth and
    windowing differ between scanners and formats.

    Raises:
        DataError: listing up to ``max_listed`` problems (each with its file
            name) and the total count, when any file or label is invalid.
    """
    problems: list[str] = []
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found")
    labels = _read_labels(labels_csv, problems)
    present = {
        path.name: path
        for path in sorted(folder.iterdir())
        if path.is_file() and _suffix(path.name) in READERS
    }
    for name in sorted(set(present) - set(labels)):
        problems.append(f"{name}: no label in {labels_csv.name}")
    for name in sorted(set(labels) - set(present)):
        if _suffix(name) in READERS:
            problems.append(f"{name}: labelled in {labels_csv.name} but not found")
        else:
            problems.append(
                f"{name}: unsupported file type; use one of "
                f"{', '.join(sorted(READERS))}"
            )

    scale = ScaleIntensity(minv=0.0, maxv=255.0)
    images, kept_labels, names = [], [], []
    for name in sorted(set(present) & set(labels)):
        image = _load_image(present[name], image_size, problems)
        if image is None:
            continue
        scaled = np.asarray(scale(image), np.float32)
        images.append(np.round(scaled).astype(np.uint8))
        kept_labels.append(labels[name])
        names.append(name)

    if not problems and not images:
        problems.append(f"{folder}: no labelled images found")
    if problems:
        listed = "; ".join(problems[:max_listed])
        more = len(problems) - max_listed
        suffix = f"; and {more} more" if more > 0 else ""
        raise DataError(
            f"image folder {folder} has {len(problems)} problem(s): {listed}{suffix}"
        )
    logger.info("read %d labelled images from %s", len(names), folder)
    return FolderDataset(
        images=np.stack(images),
        labels=np.asarray(kept_labels, np.int64),
        filenames=names,
    )


def preprocess_folder_site(
    folder: Path,
    labels_csv: Path,
    out_dir: Path,
    *,
    seed: int,
    val_fraction: float = 0.1,
    image_size: tuple[int, int] = (28, 28),
    normalization: str = "scale",
) -> dict[str, Any]:
    """Check, split and write a site's own image folder; return the manifest.

    Writes ``train.parquet``, ``val.parquet`` (a stratified ``val_fraction``)
    and ``manifest.json`` into ``out_dir``.

    Raises:
        DataError: the folder or its labels have problems (see
            ``read_image_folder``); nothing is written then.
    """
    dataset = read_image_folder(folder, labels_csv, image_size=image_size)
    kept, held_out = stratified_holdout(
        dataset.labels, fraction=val_fraction, seed=seed
    )
    splits = {
        "train": (dataset.images[kept], dataset.labels[kept]),
        "val": (dataset.images[held_out], dataset.labels[held_out]),
    }
    return write_image_splits(
        out_dir,
        splits,
        normalization=normalization,
        parameters={
            "dataset": "image_folder",
            "files": len(dataset.filenames),
            "seed": seed,
            "val_fraction": val_fraction,
        },
    )
