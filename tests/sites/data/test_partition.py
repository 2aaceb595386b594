"""Partitioners: coverage, floors, determinism, skew and errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.errors import ConfigError, DataError
from medfed.sites.data.partition import PARTITIONERS, get_partitioner, partition_indices

LABELS = np.array([0] * 300 + [1] * 700)

CASES = [
    ("iid", {}),
    ("label_skew", {"alpha": 0.5}),
    ("quantity_skew", {"alpha": 1.0}),
    ("quantity_skew", {"distribution": "power_law", "exponent": 1.5}),
]


def test_partitioner_registry_lists_built_ins():
    get_partitioner("iid")
    assert {"iid", "label_skew", "quantity_skew"} <= set(PARTITIONERS)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_partition_is_disjoint_and_sorted(name, params):
    parts = partition_indices(
        LABELS, name=name, sites=5, seed=0, min_samples=20, **params
    )
    joined = np.concatenate(parts)
    assert len(parts) == 5
    assert len(np.unique(joined)) == len(joined)
    assert all(np.array_equal(part, np.sort(part)) for part in parts)
    assert joined.min() >= 0
    assert joined.max() < len(LABELS)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_partition_uses_whole_pool(name, params):
    parts = partition_indices(LABELS, name=name, sites=4, seed=1, **params)
    assert sum(len(part) for part in parts) == len(LABELS)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_partition_repeats_for_seed(name, params):
    first = partition_indices(LABELS, name=name, sites=5, seed=7, **params)
    second = partition_indices(LABELS, name=name, sites=5, seed=7, **params)
    third = partition_indices(LABELS, name=name, sites=5, seed=8, **params)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, third, strict=True))


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.floats(min_value=0.05, max_value=50),
    sites=st.integers(min_value=1, max_value=8),
    seed=st.integers(min_value=0, max_value=2**31),
    min_samples=st.integers(min_value=1, max_value=40),
)
def test_label_skew_meets_floor(alpha, sites, seed, min_samples):
    try:
        parts = partition_indices(
            LABELS,
            name="label_skew",
            sites=sites,
            seed=seed,
            min_samples=min_samples,
            alpha=alpha,
        )
    except DataError as error:
        assert "raise alpha or lower partition.min_samples" in str(error)
        return
    assert min(len(part) for part in parts) >= min_samples


@settings(max_examples=40, deadline=None)
@given(
    alpha=st.floats(min_value=0.01, max_value=50),
    sites=st.integers(min_value=1, max_value=10),
    seed=st.integers(min_value=0, max_value=2**31),
    min_samples=st.integers(min_value=1, max_value=100),
)
def test_quantity_skew_meets_floor(alpha, sites, seed, min_samples):
    parts = partition_indices(
        LABELS,
        name="quantity_skew",
        sites=sites,
        seed=seed,
        min_samples=min_samples,
        alpha=alpha,
    )
    assert min(len(part) for part in parts) >= min_samples
    assert sum(len(part) for part in parts) == len(LABELS)


def positive_shares(parts):
    return np.array([LABELS[part].mean() for part in parts])


def test_label_skew_small_alpha_skews_labels():
    skewed = positive_shares(
        partition_indices(LABELS, name="label_skew", sites=5, seed=3, alpha=0.1)
    )
    near_iid = positive_shares(
        partition_indices(LABELS, name="label_skew", sites=5, seed=3, alpha=1000)
    )
    assert skewed.std() > 0.2
    assert near_iid.std() < 0.05


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition_indices(LABELS, name="iid", sites=7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_quantity_skew_keeps_label_mix():
    parts = partition_indices(
        LABELS, name="quantity_skew", sites=3, seed=0, min_samples=100, alpha=0.5
    )
    assert np.allclose(positive_shares(parts), 0.7, atol=0.08)


def test_power_law_sizes_are_unequal():
    parts = partition_indices(
        LABELS,
        name="quantity_skew",
        sites=5,
        seed=0,
        distribution="power_law",
        exponent=2.0,
    )
    sizes = sorted(len(part) for part in parts)
    assert sizes[-1] > 5 * sizes[0]


def test_partition_rejects_too_small_pool():
    with pytest.raises(
        DataError, match="cannot give 5 sites at least 300 samples"
    ) as caught:
        partition_indices(LABELS, name="iid", sites=5, seed=0, min_samples=300)
    assert "from a pool of 1000" in str(caught.value)


def test_label_skew_reports_unmet_floor():
    with pytest.raises(
        DataError, match="did not give every one of 10 sites 90 samples"
    ):
        partition_indices(
            LABELS,
            name="label_skew",
            sites=10,
            seed=0,
            min_samples=90,
            alpha=0.05,
            max_attempts=5,
        )


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dirichlet", {}, "unknown partitioner 'dirichlet': choose one of iid"),
        ("label_skew", {}, "missing 1 required keyword-only argument: 'alpha'"),
        ("label_skew", {"alpha": 0}, "label_skew alpha must be > 0, got 0"),
        ("quantity_skew", {"distribution": "zipf"}, "got 'zipf'"),
        ("quantity_skew", {"exponent": -1}, "exponent must be >= 0, got -1"),
        ("iid", {"alpha": 1}, "'iid': IidPartitioner\\(\\) takes no arguments"),
    ],
)
def test_partitioner_rejects_invalid_config(name, params, message):
    with pytest.raises(ConfigError, match=message):
        get_partitioner(name, **params)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sites": 0}, "sites must be >= 1, got 0"),
        ({"min_samples": 0}, "min_samples must be >= 1, got 0"),
    ],
)
def test_split_rejects_invalid_arguments(arguments, message):
    values = {"sites": 2, "seed": 0, "min_samples": 1}
    values.update(arguments)
    with pytest.raises(ConfigError, match=message):
        get_partitioner("iid").split(LABELS, **values)
