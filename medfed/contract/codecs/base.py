"""Codec interface and registry.

A codec turns a site's update (a mapping of tensor name to float32 array) into
the arrays that travel in an envelope's payload, and back. Each codec lives in
its own module and registers itself by name, so a study config can choose it.
"""

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from medfed.errors import ConfigError, EnvelopeError

__all__ = [
    "CODECS",
    "Codec",
    "Encoder",
    "TensorSpec",
    "get_codec",
    "register_codec",
    "require_array",
    "require_keys",
]

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
    #: aggregation needs because it sums payloads in a ring. A class sets the
    #: default; an instance may override it when its parameters decide (int8
    #: is linear only with a scale shared by every site).
    linear: bool = True
    #: Whether every coordinate is sent, which masking also needs.
    dense: bool = True

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


class Encoder(Protocol):
    """The part of a codec that ``encode_envelope`` uses, also met by wrappers.

    ``params`` is read after ``encode``, so a codec may record there a value
    it chose while encoding (randk's seed).
    """

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


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
    cls = CODECS[name]
    keyword_only = [
        parameter
        for parameter in inspect.signature(cls).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    accepted = [parameter.name for parameter in keyword_only]
    given = dict(params or {})
    for key in given:
        if key not in accepted:
            raise ConfigError(
                f"codec {name!r} has no parameter {key!r}: its parameters are "
                f"{', '.join(accepted) or 'none'}"
            )
    for parameter in keyword_only:
        if parameter.default is inspect.Parameter.empty and parameter.name not in given:
            raise ConfigError(f"codec {name!r} requires parameter {parameter.name}")
    return cls(**given)


def require_keys(payload: Mapping[str, np.ndarray], expected: Iterable[str]) -> None:
    """Raise EnvelopeError unless ``payload`` has exactly the ``expected`` arrays."""
    expected_keys = set(expected)
    missing = sorted(expected_keys - payload.keys())
    if missing:
        raise EnvelopeError(f"payload is missing array {missing[0]!r}")
    unexpected = sorted(payload.keys() - expected_keys)
    if unexpected:
        raise EnvelopeError(f"payload has unexpected array {unexpected[0]!r}")


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
