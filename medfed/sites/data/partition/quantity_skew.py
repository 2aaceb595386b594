"""Quantity-skew partition: sites of unequal size with the pool's label mix.

Site sizes are ``min_samples`` plus a share of the remaining samples. The
shares come from Dirichlet(alpha) (``distribution="dirichlet"``) or from a
power law, share of the k-th largest site proportional to ``k ** -exponent``
in a seeded random site order (``distribution="power_law"``). Samples are
dealt from one random permutation, so every site sees about the pool's label
distribution.
"""

from typing import Any

import numpy as np

from medfed.errors import ConfigError
from medfed.sites.data.partition.base import Partitioner, register_partitioner

__all__ = ["QuantitySkewPartitioner"]

_DISTRIBUTIONS = ("dirichlet", "power_law")


@register_partitioner("quantity_skew")
class QuantitySkewPartitioner(Partitioner):
    """Unequal site sizes with a floor of ``min_samples``.

    Args:
        distribution: ``"dirichlet"`` or ``"power_law"``.
        alpha: Dirichlet concentration (> 0) for ``"dirichlet"``.
        exponent: power-law exponent (>= 0) for ``"power_law"``; 0 gives
            equal sizes.
    """

    def __init__(
        self,
        *,
        distribution: str = "dirichlet",
        alpha: float = 1.0,
        exponent: float = 1.0,
    ) -> None:
        if distribution not in _DISTRIBUTIONS:
            raise ConfigError(
                f"quantity_skew distribution must be one of "
                f"{', '.join(_DISTRIBUTIONS)}, got {distribution!r}"
            )
        if not alpha > 0:
            raise ConfigError(f"quantity_skew alpha must be > 0, got {alpha}")
        if not exponent >= 0:
            raise ConfigError(f"quantity_skew exponent must be >= 0, got {exponent}")
        self.distribution = distribution
        self.alpha = float(alpha)
        self.exponent = float(exponent)

    def params(self) -> dict[str, Any]:
        return {
            "distribution": self.distribution,
            "alpha": self.alpha,
            "exponent": self.exponent,
        }

    def _assign(
        self,
        labels: np.ndarray,
        sites: int,
        rng: np.random.Generator,
        min_samples: int,
    ) -> list[np.ndarray]:
        if self.distribution == "dirichlet":
            shares = rng.dirichlet(np.full(sites, self.alpha))
        else:
            ranks = rng.permutation(sites) + 1
            weights = ranks.astype(np.float64) ** -self.exponent
            shares = weights / weights.sum()
        spare = len(labels) - sites * min_samples
        sizes = min_samples + rng.multinomial(spare, shares)
        order = rng.permutation(len(labels))
        return list(np.split(order, np.cumsum(sizes)[:-1]))
