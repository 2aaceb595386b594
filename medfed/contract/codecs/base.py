"""Codec interface and registry.

A codec turns a site's update (a mapping of tensor name to float32 array) into
the arrays that travel in an envelope's payload, and back. Each codec lives in
its own module and registers itself by name, so a study config can choose it.
"""

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from medfed.errors import ConfigError, EnvelopeError

__all__ = ["CODECS", "Codec", "TensorSpec", "get_codec", "register_codec"]

TensorSpec = tuple[str, tuple[int, ...], str]
"""A decoded tensor's name, shape and dtype string (numpy spelling)."""

CODECS: dict[str, type["Codec"]] = {}


class Codec(ABC):
    """Encodes an update into payload arrays and decodes it back.

    Subclasses set ``name`` and take their parameters as keyword arguments,
    validated in ``__init__``. ``params`` returns what the decoder needs to
    rebuild the codec and is written into the envelope header.
    """

    name: ClassVar[str]
    #: Whether ``decode`` is linear in the payload, which masking secure
    #: aggregation needs because it sums payloads in a ring.
    linear: ClassVar[bool] = True
    #: Whether every coordinate is sent, which masking also needs.
    dense: ClassVar[bool] = True

    @property
    def params(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the payload arrays for ``update``."""

    @abstractmethod
    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        """Rebuild float32 tensors of ``specs`` from ``payload``.

        Raises:
            EnvelopeError: the payload lacks an array, or one has the wrong
                shape or dtype for its tensor.
        """


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator that adds a codec to the registry under ``cls.name``."""
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str, params: Mapping[str, Any] | None = None) -> Codec:
    """Build the codec registered as ``name`` with ``params``.

    Raises:
        ConfigError: no codec has that name, or a parameter is invalid.
    """
    # Importing the package registers the built-in codecs.
    import medfed.contract.codecs  # noqa: F401

    if name not in CODECS:
        raise ConfigError(
            f"unknown codec {name!r}: choose one of {', '.join(sorted(CODECS))}"
        )
    try:
        return CODECS[name](**dict(params or {}))
    except TypeError as error:
        raise ConfigError(f"invalid parameters for codec {name!r}: {error}") from None


def require_array(
    payload: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...], dtype: str
) -> np.ndarray:
    """Return ``payload[key]`` after checking its shape and dtype."""
    if key not in payload:
        raise EnvelopeError(f"payload is missing array {key!r}")
    array = payload[key]
    if tuple(array.shape) != tuple(shape):
        raise EnvelopeError(
            f"payload array {key!r} has shape {list(array.shape)}, "
            f"expected {list(shape)}"
        )
    if array.dtype != np.dtype(dtype):
        raise EnvelopeError(
            f"payload array {key!r} has dtype {array.dtype}, expected {dtype}"
        )
    return array
