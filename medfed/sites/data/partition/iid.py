"""IID partition: a random permutation cut into near-equal parts."""

import numpy as np

from medfed.sites.data.partition.base import Partitioner, register_partitioner

__all__ = ["IidPartitioner"]


@register_partitioner("iid")
class IidPartitioner(Partitioner):
    """Every site draws uniformly from the pool; sizes differ by at most one."""

    def _assign(
        self,
        labels: np.ndarray,
        sites: int,
        rng: np.random.Generator,
        min_samples: int,
    ) -> list[np.ndarray]:
        return list(np.array_split(rng.permutation(len(labels)), sites))
