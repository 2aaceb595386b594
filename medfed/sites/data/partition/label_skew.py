"""Label-skew partition: per-class site shares drawn from a Dirichlet.

For each class, a share vector over the sites is drawn from
Dirichlet(alpha, ..., alpha) and the class's samples are dealt out in those
proportions. Small ``alpha`` (0.1) gives sites dominated by one class; large
``alpha`` (100) approaches IID. Dirichlet label skew is the common non-IID
split of federated-learning benchmarks.
"""

from typing import Any

import numpy as np

from medfed.errors import ConfigError, DataError
from medfed.sites.data.partition.base import Partitioner, register_partitioner

__all__ = ["LabelSkewPartitioner"]


@register_partitioner("label_skew")
class LabelSkewPartitioner(Partitioner):
    """Dirichlet label skew with redraws until every site is large enough.

    Args:
        alpha: Dirichlet concentration, > 0.
        max_attempts: draws of the whole share matrix before giving up; a
            draw is rejected when a site gets fewer than ``min_samples``.
    """

    def __init__(self, *, alpha: float, max_attempts: int = 1000) -> None:
        if not alpha > 0:
            raise ConfigError(f"label_skew alpha must be > 0, got {alpha}")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        self.alpha = float(alpha)
        self.max_attempts = max_attempts

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "max_attempts": self.max_attempts}

    def _assign(
        self,
        labels: np.ndarray,
        sites: int,
        rng: np.random.Generator,
        min_samples: int,
    ) -> list[np.ndarray]:
        classes = np.unique(labels)
        by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
        for _ in range(self.max_attempts):
            parts: list[list[np.ndarray]] = [[] for _ in range(sites)]
            for members in by_class:
                shares = rng.dirichlet(np.full(sites, self.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
                for site, chunk in enumerate(np.split(members, cuts)):
                    parts[site].append(chunk)
            result = [np.concatenate(chunks) for chunks in parts]
            if min(len(part) for part in result) >= min_samples:
                return result
        raise DataError(
            f"label_skew with alpha={self.alpha} did not give every one of {sites} "
            f"sites {min_samples} samples in {self.max_attempts} draws; raise alpha "
            "or lower partition.min_samples"
        )
