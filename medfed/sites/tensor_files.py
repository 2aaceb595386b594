"""Site-local tensor files: safetensors written atomically.

A site keeps state between rounds (SCAFFOLD's control variate, personalized
layers). A crash while writing must leave the previous file intact, so each
write goes to a temporary file in the same directory, is flushed to disk and
then renamed over the target, which POSIX makes atomic.
"""

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from medfed.errors import DataError

__all__ = ["load_tensors", "save_tensors_atomic"]


def save_tensors_atomic(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` to ``path`` as safetensors, replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    os.close(descriptor)
    try:
        save_file(arrays, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file written by ``save_tensors_atomic``.

    Raises:
        DataError: the file is missing or not a valid safetensors file.
    """
    if not path.is_file():
        raise DataError(f"tensor file {str(path)!r} not found")
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError) as error:
        raise DataError(
            f"tensor file {str(path)!r} is not a readable safetensors file: {error}"
        ) from None
