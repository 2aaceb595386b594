"""Checks shared by the codecs: parameters on entry, update tensors on encode.

Codec parameters arrive from a study config on the site and from an envelope
header on the aggregation service. Each check therefore rejects booleans
posing as numbers and non-finite floats. Its message names the codec, the
parameter, the rule and the received value.
"""

import math
import re
from collections.abc import Sequence

import numpy as np

from medfed.errors import ConfigError, EnvelopeError

__all__ = [
    "MAX_SEED",
    "check_choice",
    "check_flag",
    "check_integer",
    "check_number",
    "check_update_tensor",
    "kept_count",
]

#: Seeds are non-negative and fit in a signed 64-bit integer.
MAX_SEED = 2**63 - 1
_EXPONENT_WITHOUT_POINT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def check_integer(
    codec: str, param: str, value: object, *, minimum: int, maximum: int
) -> int:
    """Return ``value`` when it is an integer in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"codec {codec!r} parameter {param} must be an integer, got {value!r}"
        )
    if not minimum <= value <= maximum:
        raise ConfigError(
            f"codec {codec!r} parameter {param} must be between {minimum} and "
            f"{maximum}, got {value!r}"
        )
    return value


def check_number(
    codec: str, param: str, value: object, *, above: float, at_most: float
) -> float:
    """Return ``value`` as a float when it is finite and in (above, at_most]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"codec {codec!r} parameter {param} must be a number, got {value!r}"
            + _exponent_hint(value)
        )
    try:
        number = float(value)
    except OverflowError:
        # An integer beyond the float range, which YAML and JSON both allow.
        number = math.inf
    if not math.isfinite(number) or not above < number <= at_most:
        raise ConfigError(
            f"codec {codec!r} parameter {param} must be greater than {above} and "
            f"at most {at_most}, got {value!r}"
        )
    return number


def _exponent_hint(value: object) -> str:
    """Return a hint for a number that YAML read as a string, else ""."""
    # PyYAML follows YAML 1.1, whose float pattern needs a decimal point.
    if not isinstance(value, str) or not _EXPONENT_WITHOUT_POINT.fullmatch(value):
        return ""
    return (
        "; YAML reads a number in exponent form without a decimal point, such "
        "as 1e-3, as a string, so write 1.0e-3"
    )


def check_choice(codec: str, param: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` when it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(
            f"codec {codec!r} parameter {param} must be one of "
            f"{', '.join(choices)}, got {value!r}"
        )
    return value


def check_flag(codec: str, param: str, value: object) -> bool:
    """Return ``value`` when it is a boolean."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"codec {codec!r} parameter {param} must be true or false, got {value!r}"
        )
    return value


def check_update_tensor(
    codec: str, key: str, value: np.ndarray, *, require_finite: bool = True
) -> np.ndarray:
    """Return an update tensor as a contiguous float32 array.

    Args:
        require_finite: reject NaN and infinite values, which no decoder
            accepts. Lossy codecs need finite input to compute their scales.

    Raises:
        EnvelopeError: the tensor is not a real floating-point array, or it
            contains NaN or infinite values while ``require_finite`` is set.
    """
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise EnvelopeError(
            f"codec {codec!r} cannot encode tensor {key!r}: its dtype is "
            f"{array.dtype}, expected float32"
        )
    array = np.asarray(array, dtype=np.float32, order="C")
    if require_finite and not np.isfinite(array).all():
        raise EnvelopeError(
            f"codec {codec!r} cannot encode tensor {key!r}: it contains NaN or "
            "infinite values"
        )
    return array


def kept_count(fraction: float, size: int) -> int:
    """Return how many of ``size`` elements a sparsifier keeps at ``fraction``.

    The count is ``fraction * size`` rounded half up, at least 1 and at most
    ``size``. Encoder and decoder both call this, so the float arithmetic is
    the same on both sides.
    """
    if size == 0:
        return 0
    return min(size, max(1, math.floor(fraction * size + 0.5)))
