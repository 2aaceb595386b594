"""Checks for strategy and wrapper hyperparameters.

Each check raises ``ConfigError`` naming the parameter, the rule and the
received value, and returns the value converted to the checked type.
"""

import math
from collections.abc import Mapping

import numpy as np

from medfed.errors import AggregationError, ConfigError

__all__ = [
    "require_float",
    "require_int",
    "require_matching_tensors",
]


def require_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """Return ``value`` as a finite float within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    if minimum is not None:
        if exclusive_minimum and not number > minimum:
            raise ConfigError(f"{name} must be > {minimum}, got {value!r}")
        if not exclusive_minimum and not number >= minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None:
        if exclusive_maximum and not number < maximum:
            raise ConfigError(f"{name} must be < {maximum}, got {value!r}")
        if not exclusive_maximum and not number <= maximum:
            raise ConfigError(f"{name} must be <= {maximum}, got {value!r}")
    return number


def require_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return number


def require_matching_tensors(
    global_weights: Mapping[str, np.ndarray],
    delta: Mapping[str, np.ndarray],
    *,
    what: str = "mean delta",
) -> None:
    """Check that ``delta`` has exactly the tensors and shapes of the model.

    Raises:
        AggregationError: a tensor is missing, extra, or of another shape.
    """
    missing = sorted(set(global_weights) - set(delta))
    extra = sorted(set(delta) - set(global_weights))
    if missing or extra:
        raise AggregationError(
            f"{what} does not match the global model: missing tensors {missing}, "
            f"unexpected tensors {extra}"
        )
    for key, value in global_weights.items():
        if np.shape(delta[key]) != np.shape(value):
            raise AggregationError(
                f"{what} tensor {key!r} has shape {list(np.shape(delta[key]))}, "
                f"but the global model's has {list(np.shape(value))}"
            )
