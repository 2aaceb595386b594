"""Partitioners: how a labelled index set is split across the sites of a study.

A partitioner takes the labels of a pool of samples and returns one array of
pool indices per site. Every implementation must

- return disjoint, sorted index arrays whose union is a subset of the pool;
- give every site at least ``min_samples`` samples, or raise ``DataError``;
- return the same arrays for the same labels, parameters and seed.

Partitioners are registered by name so a study config can choose one
(``iid``, ``label_skew``, ``quantity_skew``).
"""

from medfed.sites.data.partition.base import (
    PARTITIONERS,
    Partitioner,
    get_partitioner,
    partition_indices,
    register_partitioner,
)

__all__ = [
    "PARTITIONERS",
    "Partitioner",
    "get_partitioner",
    "partition_indices",
    "register_partitioner",
]
