"""Partitioner interface, registry and the shared argument checks."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

from medfed.errors import ConfigError, DataError

__all__ = [
    "PARTITIONERS",
    "Partitioner",
    "get_partitioner",
    "partition_indices",
    "register_partitioner",
]

PARTITIONERS: dict[str, type["Partitioner"]] = {}

_P = TypeVar("_P", bound=type["Partitioner"])


def register_partitioner(name: str) -> Callable[[_P], _P]:
    """Class decorator that registers a partitioner under ``name``."""

    def decorator(cls: _P) -> _P:
        cls.name = name
        PARTITIONERS[name] = cls
        return cls

    return decorator


class Partitioner(ABC):
    """Splits a labelled pool into per-site index arrays.

    Subclasses take their parameters as keyword arguments validated in
    ``__init__`` and implement ``_assign``.
    """

    name: ClassVar[str]

    def split(
        self, labels: np.ndarray, *, sites: int, seed: int, min_samples: int = 1
    ) -> list[np.ndarray]:
        """Return one sorted int64 array of indices into ``labels`` per site.

        Args:
            labels: integer class labels of the pool, shape (samples,).
            sites: number of sites, at least 1.
            seed: seeds every random draw; the same seed gives the same split.
            min_samples: smallest number of samples any site may receive.

        Raises:
            ConfigError: ``sites`` or ``min_samples`` is invalid.
            DataError: the pool is too small for ``sites * min_samples``, or
                the partitioner cannot meet ``min_samples`` for this seed.
        """
        labels = np.asarray(labels).reshape(-1)
        if sites < 1:
            raise ConfigError(f"sites must be >= 1, got {sites}")
        if min_samples < 1:
            raise ConfigError(f"min_samples must be >= 1, got {min_samples}")
        if len(labels) < sites * min_samples:
            raise DataError(
                f"cannot give {sites} sites at least {min_samples} samples each "
                f"from a pool of {len(labels)}; lower partition.min_samples or "
                "the number of sites"
            )
        rng = np.random.default_rng(seed)
        parts = self._assign(labels, sites, rng, min_samples)
        result = [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
        smallest = min(len(part) for part in result)
        if smallest < min_samples:
            raise DataError(
                f"partitioner {self.name!r} gave a site {smallest} samples, fewer "
                f"than min_samples={min_samples}"
            )
        return result

    @abstractmethod
    def _assign(
        self,
        labels: np.ndarray,
        sites: int,
        rng: np.random.Generator,
        min_samples: int,
    ) -> list[np.ndarray]:
        """Return per-site index arrays; ``split`` checks and sorts them."""

    def params(self) -> dict[str, Any]:
        """Return the parameters that reproduce this partitioner (for manifests)."""
        return {}


def get_partitioner(name: str, **params: Any) -> Partitioner:
    """Build the partitioner registered as ``name`` with ``params``.

    Raises:
        ConfigError: no partitioner has that name, or a parameter is invalid.
    """
    from medfed.sites.data.partition import (  # noqa: F401  (registers built-ins)
        iid,
        label_skew,
        quantity_skew,
    )

    if name not in PARTITIONERS:
        raise ConfigError(
            f"unknown partitioner {name!r}: choose one of "
            f"{', '.join(sorted(PARTITIONERS))}"
        )
    try:
        return PARTITIONERS[name](**params)
    except TypeError as error:
        raise ConfigError(
            f"invalid parameters for partitioner {name!r}: {error}"
        ) from None


def partition_indices(
    labels: np.ndarray,
    *,
    name: str,
    sites: int,
    seed: int,
    min_samples: int = 1,
    **params: Any,
) -> list[np.ndarray]:
    """Split ``labels`` with the partitioner ``name``; see ``Partitioner.split``."""
    partitioner = get_partitioner(name, **params)
    return partitioner.split(labels, sites=sites, seed=seed, min_samples=min_samples)
