"""Config-time rejection of strategy, wrapper and secure-aggregation conflicts."""

import numpy as np
import pytest

from medfed.aggregation.compatibility import (
    build_strategy,
    check_strategy_compatibility,
)
from medfed.aggregation.strategies import SiteUpdate, sum_updates
from medfed.aggregation.wrappers.central_dp import CentralDP
from medfed.aggregation.wrappers.median import CoordinateMedian
from medfed.aggregation.wrappers.norm_bound import NormBound
from medfed.errors import ConfigError


@pytest.mark.parametrize(
    ("strategy", "wrappers", "secure_aggregation", "message"),
    [
        (
            "fedavg",
            ["median"],
            "masking",
            "median needs each site's update, but masking secure aggregation "
            "reveals only the sum; use norm_bound or central_dp instead, or set "
            "secure_aggregation: none",
        ),
        (
            "fedadam",
            ["norm_bound", "krum"],
            "masking",
            "krum needs each site's update, but masking secure aggregation",
        ),
        (
            "fedavg",
            ["median", "krum"],
            "none",
            "wrappers ['median', 'krum'] each combine the updates themselves",
        ),
        (
            "fedavg",
            ["trimmed_mean", "norm_bound"],
            "none",
            "wrapper 'trimmed_mean' combines the updates, so the wrappers listed "
            "after it (['norm_bound']) would never see them; list it last",
        ),
        (
            "scaffold",
            ["central_dp"],
            "none",
            "central_dp cannot wrap scaffold: the sites' control deltas would be "
            "released without clipping or noise",
        ),
        (
            "fedavg",
            ["norm_bound", "norm_bound"],
            "none",
            "'norm_bound' is listed twice",
        ),
        ("fedsgd", [], "none", "unknown strategy 'fedsgd': choose one of fedadagrad"),
        (
            "fedavg",
            ["clip"],
            "none",
            "unknown wrapper 'clip': choose one of central_dp",
        ),
    ],
)
def test_rejects_conflict(
    strategy: str, wrappers: list[str], secure_aggregation: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        check_strategy_compatibility(strategy, wrappers, secure_aggregation)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("strategy", "wrappers", "secure_aggregation"),
    [
        ("fedavg", ["norm_bound", "central_dp"], "masking"),
        ("fedyogi", ["central_dp"], "masking"),
        ("scaffold", ["norm_bound"], "masking"),
        ("fedadam", ["norm_bound", "median"], "none"),
        ("fedprox", [], "masking"),
    ],
)
def test_accepts_valid_combination(
    strategy: str, wrappers: list[str], secure_aggregation: str
) -> None:
    check_strategy_compatibility(strategy, wrappers, secure_aggregation)


def test_build_strategy_nests_in_listed_order() -> None:
    strategy = build_strategy(
        "fedadam",
        {"server_learning_rate": 0.05},
        [("norm_bound", {"max_norm": 3.0}), ("median", {})],
    )
    assert isinstance(strategy, NormBound)
    assert isinstance(strategy.inner, CoordinateMedian)
    assert strategy.inner.inner.name == "fedadam"
    assert strategy.needs_individual_updates


def test_build_strategy_sum_only_chain() -> None:
    strategy = build_strategy(
        "fedavg",
        {},
        [("central_dp", {"clip_norm": 1.0, "noise_multiplier": 1.0, "total_sites": 5})],
        secure_aggregation="masking",
    )
    assert isinstance(strategy, CentralDP)
    assert not strategy.needs_individual_updates
    assert strategy.uniform_weighting


def test_build_strategy_reports_wrapper_parameter() -> None:
    with pytest.raises(ConfigError, match=r"invalid parameters for wrapper 'krum'"):
        build_strategy("fedavg", {}, [("krum", {"byzantine": 1})])


@pytest.mark.parametrize(
    ("strategy", "params", "wrappers"),
    [
        ("fedavg", {}, []),
        ("fedadam", {"tau": 0.1}, []),
        ("fedavgm", {}, [("norm_bound", {"max_norm": 10.0})]),
        ("scaffold", {"total_sites": 3}, []),
        (
            "fedyogi",
            {},
            [
                (
                    "central_dp",
                    {
                        "clip_norm": 10.0,
                        "noise_multiplier": 1.0,
                        "total_sites": 3,
                        "noise_key": bytes(32),
                    },
                )
            ],
        ),
    ],
)
def test_sum_path_matches_individual_path(
    strategy: str, params: dict, wrappers: list
) -> None:
    # What the service computes from unmasked sums must equal what it
    # computes from the individual updates, when every site is within bounds.
    updates = [
        SiteUpdate(
            site,
            {"w": np.array([value, -value], np.float32)},
            count,
            {"control_delta": {"w": np.array([value / 2, 0.0], np.float32)}}
            if strategy == "scaffold"
            else {},
        )
        for site, value, count in [("a", 0.2, 10), ("b", 0.5, 30), ("c", -0.1, 5)]
    ]
    global_weights = {"w": np.array([1.0, 1.0], np.float32)}
    individual = build_strategy(strategy, params, wrappers)
    summed = build_strategy(strategy, params, wrappers, secure_aggregation="masking")
    for _ in range(2):
        expected = individual.aggregate(global_weights, updates)
        sums = sum_updates(updates, uniform=summed.uniform_weighting)
        result = summed.aggregate_sum(global_weights, sums)
        np.testing.assert_allclose(result["w"], expected["w"], rtol=1e-6)
        global_weights = expected
