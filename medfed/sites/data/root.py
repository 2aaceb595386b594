"""Resolution of the data root and checksum-verified downloads.

The data root is, in order: the path in the study config (``data.root``), the
environment variable ``MEDFED_DATA_DIR``, ``../shared/data`` beside the
working directory or the repository when it exists; otherwise the download
cache ``~/.cache/medfed/data``. Files are downloaded from their official
source, and checked against their SHA-256, only into the download cache. A
file missing from any other root is an error that names the file, its SHA-256
and its source, because that root is the user's choice.
"""

import hashlib
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medfed.errors import DataError

__all__ = [
    "DatasetFile",
    "download_cache",
    "file_sha256",
    "is_download_cache",
    "resolve_data_root",
    "verified_file",
]

logger = logging.getLogger(__name__)

ENV_VAR = "MEDFED_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class DatasetFile:
    """A file of a public dataset: where it lives, where it comes from, its hash."""

    folder: str
    name: str
    sha256: str
    url: str


def resolve_data_root(configured: str | None = None) -> Path:
    """Return the data root, following the order in the module docstring.

    The download cache is returned when no local root exists; files are
    fetched into it on demand by ``verified_file``.
    """
    if configured:
        return Path(configured).expanduser()
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    for candidate in (
        Path.cwd() / ".." / "shared" / "data",
        _REPO_ROOT / ".." / "shared" / "data",
    ):
        if candidate.is_dir():
            return candidate.resolve()
    return download_cache()


def download_cache() -> Path:
    """Return the folder that downloads go to, the data root of last resort."""
    return Path.home() / ".cache" / "medfed" / "data"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_file(
    root: Path, spec: DatasetFile, *, download: bool | None = None
) -> Path:
    """Return the path of ``spec`` under ``root``, downloading it when allowed.

    ``download`` None allows a download only when ``root`` is the download
    cache; True allows it into any root and False never.

    Raises:
        DataError: the file is absent and may not or cannot be downloaded, or
            its SHA-256 differs from the published one.
    """
    path = root / spec.folder / spec.name
    if download is None:
        download = is_download_cache(root)
    if not path.exists():
        if not download:
            # A root that does not exist is most often a mistyped data.root or
            # MEDFED_DATA_DIR, so the message names that case.
            missing = "" if root.is_dir() else ", which does not exist"
            raise DataError(
                f"data file {spec.folder}/{spec.name} not found in data root "
                f"{root}{missing}; "
                f"download it from {spec.url} into {root / spec.folder}/ (SHA-256 "
                f"{spec.sha256}), or set data.root or {ENV_VAR} to a folder that "
                f"contains {spec.folder}/{spec.name}"
            )
        _download(spec, path)
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise DataError(
            f"data file {path} has SHA-256 {actual}, expected {spec.sha256}; "
            "replace it with the original file"
        )
    return path


def is_download_cache(root: Path) -> bool:
    """Return whether ``root`` is the download cache, the only root downloads go to."""
    return root.expanduser().resolve() == download_cache().resolve()


def _download(spec: DatasetFile, path: Path) -> None:
    logger.info("downloading %s from %s", spec.name, spec.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response:
            data = response.read()
    except OSError as error:
        raise DataError(
            f"data file {path} not found and the download from {spec.url} failed "
            f"({error}); set {ENV_VAR} to a folder that contains {spec.folder}/"
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise DataError(
            f"download of {spec.url} has SHA-256 {actual}, expected {spec.sha256}; "
            "the file was not saved"
        )
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
        handle.write(data)
    os.replace(handle.name, path)
