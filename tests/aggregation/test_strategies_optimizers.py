"""Server optimizers, FedAvgM, FedProx and SCAFFOLD against hand-computed values."""

import math

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.strategies import SiteUpdate, get_strategy
from medfed.errors import AggregationError, ConfigError


def scalar(value: float) -> dict[str, np.ndarray]:
    return {"w": np.array([value], np.float32)}


def update(site: str, value: float, count: int = 1, **extras: float) -> SiteUpdate:
    return SiteUpdate(
        site,
        scalar(value),
        count,
        {group: scalar(extra) for group, extra in extras.items()},
    )


def through_safetensors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(load_safetensors(save_safetensors(state)))


# Two rounds from x = 1.0 with beta1 = 0.9, beta2 = 0.99, tau = 0.1 and
# server_learning_rate = 1. Round one's mean delta is (0.2 * 1 + 0.6 * 3) / 4
# = 0.5, so g1 = -0.5; round two's delta is -0.2, so g2 = 0.2. v starts at
# tau^2 = 0.01, m at 0: m1 = 0.1 * -0.5 = -0.05, m2 = 0.9 * -0.05 + 0.1 * 0.2
# = -0.025.
# FedAdam:    v1 = 0.99 * 0.01 + 0.01 * 0.25 = 0.0124
#             v2 = 0.99 * 0.0124 + 0.01 * 0.04 = 0.012676
# FedYogi:    v1 = 0.01 + 0.01 * 0.25 = 0.0125 (v0 < g1^2)
#             v2 = 0.0125 + 0.01 * 0.04 = 0.0129 (v1 < g2^2)
# FedAdagrad: v1 = 0.01 + 0.25 = 0.26, v2 = 0.26 + 0.04 = 0.30
HAND_SECOND_MOMENTS = {
    "fedadam": (0.0124, 0.012676),
    "fedyogi": (0.0125, 0.0129),
    "fedadagrad": (0.26, 0.30),
}


@pytest.mark.parametrize("name", sorted(HAND_SECOND_MOMENTS))
def test_adaptive_optimizer_two_steps(name: str) -> None:
    params = {"server_learning_rate": 1.0, "beta1": 0.9, "tau": 0.1}
    if name != "fedadagrad":
        params["beta2"] = 0.99
    strategy = get_strategy(name, params)
    v1, v2 = HAND_SECOND_MOMENTS[name]

    first = strategy.aggregate(scalar(1.0), [update("a", 0.2, 1), update("b", 0.6, 3)])
    x1 = 1.0 + 0.05 / (math.sqrt(v1) + 0.1)
    assert first["w"][0] == pytest.approx(x1, rel=1e-6)
    assert first["w"].dtype == np.float32

    second = strategy.aggregate(first, [update("a", -0.2)])
    x2 = float(first["w"][0]) + 0.025 / (math.sqrt(v2) + 0.1)
    assert second["w"][0] == pytest.approx(x2, rel=1e-6)


@pytest.mark.parametrize("name", sorted(HAND_SECOND_MOMENTS))
def test_adaptive_optimizer_state_round_trip(name: str) -> None:
    original = get_strategy(name, {"tau": 0.1})
    weights = original.aggregate(scalar(1.0), [update("a", 0.5)])
    restored = get_strategy(name, {"tau": 0.1})
    restored.load_state_dict(through_safetensors(original.state_dict()))

    continued = original.aggregate(weights, [update("a", -0.2)])
    resumed = restored.aggregate(weights, [update("a", -0.2)])

    assert set(restored.state_dict()) == {"first_moment/w", "second_moment/w"}
    np.testing.assert_array_equal(continued["w"], resumed["w"])


def test_adaptive_optimizer_rejects_unknown_state_key() -> None:
    strategy = get_strategy("fedadam")
    with pytest.raises(AggregationError, match=r"unexpected key 'moment/w'"):
        strategy.load_state_dict({"moment/w": np.zeros(1)})


def test_adaptive_optimizer_failed_round_keeps_state() -> None:
    strategy = get_strategy("fedyogi")
    strategy.aggregate(scalar(1.0), [update("a", 0.5)])
    before = strategy.state_dict()
    bad = {"w": np.zeros(1, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(AggregationError, match=r"unexpected tensors \['b'\]"):
        strategy.apply(scalar(1.0), bad)
    after = strategy.state_dict()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedadam", {"beta1": 1.0}, "beta1 must be < 1.0, got 1.0"),
        ("fedyogi", {"beta2": -0.1}, "beta2 must be >= 0.0, got -0.1"),
        ("fedadagrad", {"tau": 0}, "tau must be > 0.0, got 0"),
        ("fedadam", {"server_learning_rate": "1"}, "must be a number, got '1'"),
        ("fedadagrad", {"beta2": 0.9}, "unexpected keyword argument 'beta2'"),
        ("fedavgm", {"momentum": 1.5}, "momentum must be < 1.0, got 1.5"),
        ("fedprox", {"mu": -1}, "mu must be >= 0.0, got -1"),
        ("scaffold", {"total_sites": 0}, "total_sites must be >= 1, got 0"),
        ("scaffold", {}, "missing 1 required keyword-only argument: 'total_sites'"),
    ],
)
def test_strategy_rejects_invalid_parameter(
    name: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        get_strategy(name, params)


def test_fedavgm_momentum_by_hand() -> None:
    # velocity: 1, then 0.9 * 1 + 0.5 = 1.4, then 0.9 * 1.4 + 0 = 1.26
    # weights:  0 + 1 = 1, then 1 + 1.4 = 2.4, then 2.4 + 1.26 = 3.66
    strategy = get_strategy("fedavgm", {"momentum": 0.9, "server_learning_rate": 1.0})
    weights = scalar(0.0)
    expected = [1.0, 2.4, 3.66]
    for delta, value in zip([1.0, 0.5, 0.0], expected, strict=True):
        weights = strategy.aggregate(weights, [update("a", delta)])
        assert weights["w"][0] == pytest.approx(value, rel=1e-6)
    assert strategy.state_dict()["velocity/w"][0] == pytest.approx(1.26)


def test_fedavgm_state_round_trip() -> None:
    original = get_strategy("fedavgm", {"momentum": 0.5})
    weights = original.aggregate(scalar(0.0), [update("a", 1.0)])
    restored = get_strategy("fedavgm", {"momentum": 0.5})
    restored.load_state_dict(through_safetensors(original.state_dict()))
    np.testing.assert_array_equal(
        original.aggregate(weights, [update("a", 2.0)])["w"],
        restored.aggregate(weights, [update("a", 2.0)])["w"],
    )


def test_fedprox_averages_and_publishes_mu() -> None:
    strategy = get_strategy("fedprox", {"mu": 0.1})
    result = strategy.aggregate(scalar(1.0), [update("a", 0.2, 1), update("b", 0.6, 3)])
    assert result["w"][0] == pytest.approx(1.5)
    assert strategy.site_settings() == {"proximal_mu": 0.1}


def test_scaffold_server_control_by_hand() -> None:
    strategy = get_strategy("scaffold", {"total_sites": 4})
    # Round one: 2 of 4 sites; mean delta (0.2 + 0.6 * 3) / 4 = 0.5, mean
    # control delta (0.4 + 0.8) / 2 = 0.6, so c = 0 + 2 / 4 * 0.6 = 0.3.
    first = strategy.aggregate(
        scalar(1.0),
        [
            update("a", 0.2, 1, control_delta=0.4),
            update("b", 0.6, 3, control_delta=0.8),
        ],
    )
    assert first["w"][0] == pytest.approx(1.5)
    published = strategy.published_tensors()["control_variate"]
    assert published["w"][0] == pytest.approx(0.3)
    assert published["w"].dtype == np.float32

    # Round two: all 4 sites, control deltas -0.2 each: c = 0.3 + 1 * -0.2.
    updates = [update(s, 0.0, 1, control_delta=-0.2) for s in "abcd"]
    strategy.aggregate(first, updates)
    published = strategy.published_tensors()["control_variate"]
    assert published["w"][0] == pytest.approx(0.1)


def test_scaffold_state_round_trip() -> None:
    original = get_strategy("scaffold", {"total_sites": 2})
    original.aggregate(scalar(0.0), [update("a", 0.1, control_delta=0.5)])
    restored = get_strategy("scaffold", {"total_sites": 2})
    restored.load_state_dict(through_safetensors(original.state_dict()))
    assert restored.published_tensors()["control_variate"]["w"][0] == pytest.approx(
        0.25
    )


def test_scaffold_requires_control_delta() -> None:
    strategy = get_strategy("scaffold", {"total_sites": 2})
    with pytest.raises(AggregationError, match=r"carry no 'control_delta' tensors"):
        strategy.aggregate(scalar(0.0), [update("a", 0.1)])


def test_scaffold_rejects_more_sites_than_total() -> None:
    strategy = get_strategy("scaffold", {"total_sites": 1})
    updates = [update("a", 0.1, control_delta=0.0), update("b", 0.1, control_delta=0.0)]
    with pytest.raises(
        AggregationError, match=r"2 sites sent updates, .* total_sites=1"
    ):
        strategy.aggregate(scalar(0.0), updates)


def test_aggregate_rejects_zero_sample_count() -> None:
    strategy = get_strategy("fedadam")
    with pytest.raises(AggregationError, match=r"'b' reported sample_count 0"):
        strategy.aggregate(scalar(0.0), [update("a", 0.1), update("b", 0.1, 0)])


def test_aggregate_rejects_mismatched_tensors() -> None:
    strategy = get_strategy("fedavg")
    odd = SiteUpdate("b", {"w": np.zeros(2, np.float32)}, 1)
    with pytest.raises(AggregationError, match=r"'w' of shape \[2\], expected \[1\]"):
        strategy.aggregate(scalar(0.0), [update("a", 0.1), odd])
