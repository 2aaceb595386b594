"""Norm bounding and the robust rules against small hand-computed tables."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.compatibility import build_strategy
from medfed.aggregation.strategies import SiteUpdate, UpdateSum, get_strategy
from medfed.aggregation.wrappers import clip_update, get_wrapper, update_norm
from medfed.aggregation.wrappers.krum import krum_scores
from medfed.errors import AggregationError, ConfigError


def vector(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


def updates_of(
    values: list[float], counts: list[int] | None = None
) -> list[SiteUpdate]:
    counts = counts or [1] * len(values)
    return [
        SiteUpdate(f"site-{index}", vector(value), count)
        for index, (value, count) in enumerate(zip(values, counts, strict=True))
    ]


def robust(name: str, **params: object):
    return get_wrapper(name, get_strategy("fedavg"), params)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 5.0, 2.0], 2.0),
        ([1.0, 2.0, 3.0, 100.0], 2.5),
        ([-7.0], -7.0),
        ([0.0, 0.0, 0.0], 0.0),
    ],
)
def test_median_table(values: list[float], expected: float) -> None:
    result = robust("median").aggregate(vector(0.0), updates_of(values))
    assert result["w"][0] == pytest.approx(expected)


def test_median_is_coordinate_wise_and_ignores_counts() -> None:
    updates = [
        SiteUpdate("a", {"w": np.array([1.0, 9.0], np.float32)}, 1000),
        SiteUpdate("b", {"w": np.array([2.0, 8.0], np.float32)}, 1),
        SiteUpdate("c", {"w": np.array([3.0, 7.0], np.float32)}, 1),
    ]
    result = robust("median").aggregate({"w": np.zeros(2, np.float32)}, updates)
    np.testing.assert_allclose(result["w"], [2.0, 8.0])


@pytest.mark.parametrize(
    ("values", "beta", "expected"),
    [
        # floor(0.2 * 5) = 1 trimmed per end: mean of 1, 2, 3.
        ([10.0, 1.0, 2.0, 3.0, -50.0], 0.2, 2.0),
        # floor(0.1 * 5) = 0: the plain mean.
        ([10.0, 1.0, 2.0, 3.0, -50.0], 0.1, -6.8),
        # floor(0.4 * 5) = 2 per end: the median.
        ([10.0, 1.0, 2.0, 3.0, -50.0], 0.4, 2.0),
        # floor(0.25 * 4) = 1 per end: mean of 2 and 3.
        ([1.0, 2.0, 3.0, 40.0], 0.25, 2.5),
    ],
)
def test_trimmed_mean_table(values: list[float], beta: float, expected: float) -> None:
    result = robust("trimmed_mean", beta=beta).aggregate(
        vector(0.0), updates_of(values)
    )
    assert result["w"][0] == pytest.approx(expected)


def test_trimmed_mean_rejects_half() -> None:
    with pytest.raises(ConfigError, match=r"beta must be < 0.5, got 0.5"):
        robust("trimmed_mean", beta=0.5)


def test_krum_scores_by_hand() -> None:
    # f = 1, n = 5: each score sums the n - f - 2 = 2 smallest squared
    # distances to the other updates.
    updates = updates_of([0.6, 0.7, 0.8, 0.75, 10.0])
    expected = [
        0.01 + 0.0225,  # 0.6: to 0.7 and 0.75
        0.0025 + 0.01,  # 0.7: to 0.75 and 0.6 (or 0.8)
        0.0025 + 0.01,  # 0.8: to 0.75 and 0.7
        0.0025 + 0.0025,  # 0.75: to 0.7 and 0.8
        84.64 + 85.5625,  # 10.0: to 0.8 and 0.75
    ]
    np.testing.assert_allclose(krum_scores(updates, 1), expected, rtol=1e-5)


def test_krum_picks_lowest_score() -> None:
    updates = updates_of([0.6, 0.7, 0.8, 0.75, 10.0])
    result = robust("krum", f=1).aggregate(vector(0.0), updates)
    assert result["w"][0] == pytest.approx(0.75)


def test_krum_three_updates_without_byzantine() -> None:
    # f = 0 keeps one neighbour: 0.2 scores 0.25, 0.7 and 1.0 both 0.09; the
    # tie goes to the earlier update, 0.7.
    updates = updates_of([0.2, 0.7, 1.0])
    result = robust("krum", f=0).aggregate(vector(0.0), updates)
    assert result["w"][0] == pytest.approx(0.7)


def test_krum_one_byzantine_among_three_picks_middle(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # f = 1, n = 3: n - f - 2 = 0, so each update is scored against its one
    # nearest neighbour: 0.2 scores 0.25, 0.7 and 1.0 both 0.09; the tie goes
    # to the earlier update, 0.7. Three updates are below 2f + 3 = 5.
    updates = updates_of([0.2, 0.7, 1.0])
    with caplog.at_level("WARNING", logger="medfed.aggregation.wrappers.krum"):
        result = robust("krum", f=1).aggregate(vector(0.0), updates)
    assert result["w"][0] == pytest.approx(0.7)
    assert "its guarantee needs 5 (2f + 3)" in caplog.text


def test_krum_rejects_too_few_updates() -> None:
    updates = updates_of([0.2, 0.7, 1.0])
    with pytest.raises(
        AggregationError,
        match=r"Krum with f=2 needs at least 4 updates \(f \+ 2\), got 3",
    ):
        robust("krum", f=2).aggregate(vector(0.0), updates)


def test_multi_krum_weighted_mean_of_kept() -> None:
    # Lowest three scores: 0.75, then 0.7 and 0.8; weighted by counts 1, 2, 1:
    # (0.7 * 1 + 0.8 * 2 + 0.75 * 1) / 4 = 0.7625.
    updates = updates_of([0.6, 0.7, 0.8, 0.75, 10.0], [1, 1, 2, 1, 1])
    result = robust("multi_krum", f=1, m=3).aggregate(vector(0.0), updates)
    assert result["w"][0] == pytest.approx(0.7625)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {"f": 1}),
        ("multi_krum", {"f": 1, "m": 3}),
        ("norm_bound", {"max_norm": 1.0}),
    ],
)
@pytest.mark.parametrize("value", [0.0, 0.3])
def test_robust_rules_identical_or_zero_updates(
    name: str, params: dict[str, object], value: float
) -> None:
    updates = updates_of([value] * 5)
    result = get_wrapper(name, get_strategy("fedavg"), params).aggregate(
        vector(1.0), updates
    )
    assert np.all(np.isfinite(result["w"]))
    assert result["w"][0] == pytest.approx(1.0 + value)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "norm_bound"])
def test_robust_rules_reject_zero_sample_count(name: str) -> None:
    params = {"norm_bound": {"max_norm": 1.0}, "krum": {"f": 0}}.get(name, {})
    strategy = get_wrapper(name, get_strategy("fedavg"), params)
    updates = updates_of([0.1, 0.2, 0.3], [1, 0, 1])
    with pytest.raises(AggregationError, match=r"'site-1' reported sample_count 0"):
        strategy.aggregate(vector(0.0), updates)


def test_robust_rule_rejects_sum_only_input() -> None:
    summed = UpdateSum(delta=vector(1.0), weight_total=2.0, site_count=2)
    with pytest.raises(AggregationError, match=r"median needs each site's update"):
        robust("median").aggregate_sum(vector(0.0), summed)


def test_median_applies_to_control_deltas() -> None:
    strategy = build_strategy("scaffold", {"total_sites": 3}, [("median", {})])
    updates = [
        SiteUpdate(site, vector(d), 1, {"control_delta": vector(c)})
        for site, d, c in [("a", 1.0, 0.1), ("b", 2.0, 0.2), ("c", 90.0, 50.0)]
    ]
    result = strategy.aggregate(vector(0.0), updates)
    assert result["w"][0] == pytest.approx(2.0)
    # c = 0 + 3 / 3 * median(control deltas) = 0.2
    control = strategy.published_tensors()["control_variate"]["w"][0]
    assert control == pytest.approx(0.2)


def test_norm_bound_clips_before_mean() -> None:
    # Deltas (3, 4) and (0, 1) clipped to norm 1: (0.6, 0.8) and (0, 1).
    strategy = robust("norm_bound", max_norm=1.0)
    updates = [
        SiteUpdate("a", {"w": np.array([3.0, 4.0], np.float32)}, 1),
        SiteUpdate("b", {"w": np.array([0.0, 1.0], np.float32)}, 1),
    ]
    result = strategy.aggregate({"w": np.zeros(2, np.float32)}, updates)
    np.testing.assert_allclose(result["w"], [0.3, 0.9], rtol=1e-6)
    assert strategy.site_settings() == {"clip_norm": 1.0}


def test_wrapper_state_round_trip() -> None:
    strategy = build_strategy(
        "fedyogi", {"tau": 0.1}, [("norm_bound", {"max_norm": 5.0})]
    )
    weights = strategy.aggregate(vector(0.0), updates_of([1.0, 2.0]))
    state = dict(load_safetensors(save_safetensors(strategy.state_dict())))
    assert set(state) == {"inner/first_moment/w", "inner/second_moment/w"}
    restored = build_strategy(
        "fedyogi", {"tau": 0.1}, [("norm_bound", {"max_norm": 5.0})]
    )
    restored.load_state_dict(state)
    np.testing.assert_array_equal(
        strategy.aggregate(weights, updates_of([0.5]))["w"],
        restored.aggregate(weights, updates_of([0.5]))["w"],
    )


def test_wrapper_rejects_foreign_state_key() -> None:
    strategy = robust("median")
    with pytest.raises(AggregationError, match=r"unexpected key 'velocity/w'"):
        strategy.load_state_dict({"velocity/w": np.zeros(1)})


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    first=arrays(np.float32, st.integers(1, 6), elements=finite),
    second=arrays(np.float32, (2, 2), elements=finite),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clip_update_properties(
    first: np.ndarray, second: np.ndarray, max_norm: float
) -> None:
    update = {"a": first, "b": second}
    clipped, norm = clip_update(update, max_norm=max_norm)

    assert norm == pytest.approx(update_norm(update))
    assert update_norm(clipped) <= max_norm * (1 + 1e-9) + 1e-12
    scale = 1.0 if norm <= max_norm else max_norm / norm
    for key, value in update.items():
        expected = value.astype(np.float64) * scale
        np.testing.assert_allclose(clipped[key], expected, rtol=1e-9, atol=1e-12)
    if norm <= max_norm:
        for key, value in update.items():
            np.testing.assert_array_equal(clipped[key], value.astype(np.float64))


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(finite, min_size=5, max_size=9),
    beta=st.floats(0.0, 0.49),
)
def test_robust_results_stay_within_input_range(
    values: list[float], beta: float
) -> None:
    updates = updates_of(values)
    low, high = min(values), max(values)
    for strategy in [
        robust("median"),
        robust("trimmed_mean", beta=beta),
        robust("krum", f=1),
    ]:
        result = float(strategy.aggregate(vector(0.0), updates)["w"][0])
        tolerance = 1e-6 * max(1.0, abs(low), abs(high))
        assert low - tolerance <= result <= high + tolerance


def test_clip_update_rejects_non_positive_bound() -> None:
    with pytest.raises(ConfigError, match=r"max_norm must be > 0.0, got 0"):
        clip_update(vector(1.0), max_norm=0)


def test_robust_rule_rejects_inner_combining_rule() -> None:
    median = get_wrapper("median", get_strategy("fedavg"))
    with pytest.raises(ConfigError, match="krum and median each combine the updates"):
        get_wrapper("krum", median, {"f": 0})
