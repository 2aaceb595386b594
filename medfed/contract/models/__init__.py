"""Model architectures that sites and the coordinator build by name.

Architectures import torch, which the aggregation service does not need, so
this package is imported only by sites and the coordinator.
"""

from collections.abc import Callable
from typing import Any

from torch import nn

from medfed.errors import ConfigError

__all__ = ["MODELS", "build_model", "register_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(
    name: str,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model factory under ``name``."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return decorator


def build_model(name: str, **params: Any) -> nn.Module:
    """Build the model registered as ``name`` with ``params``.

    Raises:
        ConfigError: no model has that name, or a parameter is invalid.
    """
    from medfed.contract.models import (  # noqa: F401  (registers built-ins)
        logistic,
        resnet,
    )

    if name not in MODELS:
        raise ConfigError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}"
        )
    try:
        return MODELS[name](**params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid parameters for model {name!r}: {error}") from None
