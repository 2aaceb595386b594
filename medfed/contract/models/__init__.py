"""Model architectures that sites and the coordinator build by name.

Architectures import torch, which the aggregation service does not need, so
this package is imported only by sites and the coordinator.
"""

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from medfed.errors import ConfigError

__all__ = [
    "MODELS",
    "build_model",
    "check_positive_int",
    "model_names",
    "register_model",
]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(
    name: str,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model factory under ``name``."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return decorator


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive integer, or raise ValueError naming it.

    Booleans and integral floats such as 9.0 are rejected too, because torch
    layers such as GroupNorm accept True and 9.0 as 1 and 9 without complaint.
    ``build_model`` reports the ValueError as a ConfigError.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def model_names() -> list[str]:
    """Return the names of the registered models, sorted."""
    _register_builtins()
    return sorted(MODELS)


def build_model(name: str, **params: Any) -> nn.Module:
    """Build the model registered as ``name`` with ``params``.

    Raises:
        ConfigError: no model has that name, or a parameter is unknown,
            missing or invalid.
    """
    _register_builtins()
    if name not in MODELS:
        raise ConfigError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}"
        )
    factory = MODELS[name]
    _check_parameter_names(name, factory, params)
    try:
        return factory(**params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid parameters for model {name!r}: {error}") from None


def _register_builtins() -> None:
    from medfed.contract.models import (  # noqa: F401  (registers built-ins)
        logistic,
        resnet,
        scatter,
    )


def _check_parameter_names(
    name: str, factory: Callable[..., nn.Module], params: dict[str, Any]
) -> None:
    """Raise ConfigError for a keyword that ``factory`` lacks or requires.

    A factory that takes ``**kwargs`` accepts every keyword, so only its
    required parameters are checked.
    """
    signature = inspect.signature(factory)
    keywords = {
        parameter.name: parameter
        for parameter in signature.parameters.values()
        if parameter.kind
        in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    accepts_any = any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD
        for parameter in signature.parameters.values()
    )
    accepted = ", ".join(keywords) or "no parameters"
    unknown = sorted(set(params) - set(keywords))
    if unknown and not accepts_any:
        raise ConfigError(
            f"invalid parameters for model {name!r}: unexpected keyword argument "
            f"{unknown[0]!r}; it accepts {accepted}"
        )
    missing = [
        keyword
        for keyword, parameter in keywords.items()
        if parameter.default is inspect.Parameter.empty and keyword not in params
    ]
    if missing:
        raise ConfigError(
            f"invalid parameters for model {name!r}: missing required parameter "
            f"{missing[0]!r}; set it in model.params"
        )
