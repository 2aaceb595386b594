"""Error feedback: a site carries what its lossy codec dropped into the next round.

Each round the site encodes ``update + residual`` instead of ``update``, then
keeps ``residual = (update + residual) - decode(encode(update + residual))``,
computed in float32, for the next round. So every coordinate that topk,
randk, int8 or lowbit dropped or rounded is sent in a later round instead of
being lost, which matters most for biased codecs such as topk. Because the
residual comes from decoding the payload itself, it also contains the rounding
error of the values that topk kept (float16 or int8 values).

The residual is computed from the update that DP-SGD produced, so it is
post-processing of a DP output and spends no privacy budget. It never leaves
the site: it is a safetensors file in the site's state directory, replaced
atomically (temporary file, fsync, ``os.replace``). A crash therefore leaves
either the old or the new residual, never a torn file. The residual advances
only on ``commit``, which the site calls once the aggregation service
accepted the upload, so a failed upload can be retried from the same
residual without counting an update twice.
"""

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from medfed.contract.codecs import Codec
from medfed.errors import ConfigError, DataError

__all__ = ["RESIDUAL_FILE_NAME", "ErrorFeedback"]

logger = logging.getLogger(__name__)

RESIDUAL_FILE_NAME = "error_feedback.safetensors"


class ErrorFeedback:
    """Wraps a codec so that each encode adds the residual of the last round.

    It has the ``name``, ``params`` and ``encode`` that ``encode_envelope``
    reads, so it can be passed there as ``codec``. Not thread-safe: one site
    encodes one update at a time.
    """

    def __init__(self, codec: Codec, *, state_dir: Path) -> None:
        """Bind the codec and the directory that contains the residual file.

        Args:
            codec: the codec whose error is carried over.
            state_dir: the site's state directory; created when missing.
        """
        self.codec = codec
        self.path = Path(state_dir) / RESIDUAL_FILE_NAME
        self._pending: dict[str, np.ndarray] | None = None

    @property
    def name(self) -> str:
        return self.codec.name

    @property
    def params(self) -> dict[str, Any]:
        return self.codec.params

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode ``update`` plus the stored residual and hold the new residual.

        The new residual is written only by ``commit``. Calling ``encode``
        again before ``commit`` starts over from the stored residual.

        Raises:
            ConfigError: the stored residual's tensors differ in names or
                shapes from ``update`` (the model changed).
            DataError: the residual file is unreadable.
        """
        residual = self.load_residual(update)
        compensated = {
            key: np.asarray(value, dtype=np.float32) + residual[key]
            for key, value in update.items()
        }
        arrays = self.codec.encode(compensated)
        specs = [(key, value.shape, "float32") for key, value in compensated.items()]
        decoded = self.codec.decode(arrays, specs)
        self._pending = {
            key: np.asarray(compensated[key] - decoded[key]) for key in compensated
        }
        return arrays

    def commit(self) -> None:
        """Persist the residual held by the last ``encode``, atomically.

        NOTE: a crash after the service accepted the upload and before this
        call leaves the older residual in place, so the next round sends
        that residual a second time.
        """
        if self._pending is None:
            raise ConfigError(
                "error feedback has no residual to commit: call encode first"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=self.path.parent, prefix=".residual-", suffix=".tmp"
        )
        os.close(descriptor)
        try:
            save_file(self._pending, temporary, metadata={"codec": self.codec.name})
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._pending = None
        logger.debug("stored the error feedback residual in %s", self.path)

    def load_residual(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the stored residual, or zeros shaped like ``update`` if none."""
        if not self.path.exists():
            return {
                key: np.zeros(np.shape(value), dtype=np.float32)
                for key, value in update.items()
            }
        try:
            residual = load_file(self.path)
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            raise DataError(
                f"error feedback residual {self.path} is unreadable ({error}); "
                "delete it to restart error feedback from zero"
            ) from None
        problem = _describe_mismatch(residual, update)
        if problem:
            raise ConfigError(
                f"error feedback residual {self.path} does not match the update: "
                f"{problem}; delete it to restart error feedback from zero"
            )
        return residual


def _describe_mismatch(
    residual: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
) -> str | None:
    """Return what differs between the stored residual and the update, if anything."""
    missing = sorted(update.keys() - residual.keys())
    if missing:
        return f"it has no tensor {missing[0]!r}"
    extra = sorted(residual.keys() - update.keys())
    if extra:
        return f"it has a tensor {extra[0]!r} that the update lacks"
    for key, value in update.items():
        if residual[key].shape != np.shape(value):
            return (
                f"tensor {key!r} has shape {list(residual[key].shape)} there and "
                f"{list(np.shape(value))} in the update"
            )
        if residual[key].dtype != np.float32:
            return f"tensor {key!r} has dtype {residual[key].dtype}, expected float32"
    return None
