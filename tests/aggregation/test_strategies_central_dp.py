"""Central DP: noise scale, clipping, accounting against Opacus, adaptive clipping."""

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.strategies import SiteUpdate, UpdateSum, get_strategy
from medfed.aggregation.wrappers import get_wrapper
from medfed.aggregation.wrappers.central_dp import CLIP_INDICATOR, CentralDP
from medfed.errors import AggregationError, ConfigError


def central_dp(**params: object) -> CentralDP:
    defaults: dict[str, object] = {
        "clip_norm": 2.0,
        "noise_multiplier": 1.5,
        "total_sites": 10,
        "sites_per_round": 4,
        "noise_key": bytes(32),
    }
    defaults.update(params)
    wrapper = get_wrapper("central_dp", get_strategy("fedavg"), defaults)
    assert isinstance(wrapper, CentralDP)
    return wrapper


def zeros(size: int) -> dict[str, np.ndarray]:
    return {"w": np.zeros(size, np.float32)}


def test_noise_scale_matches_sigma_c_over_n() -> None:
    # Zero deltas isolate the noise: each coordinate of the released mean is
    # N(0, (sigma * C / n)^2) with sigma * C / n = 1.5 * 2 / 4 = 0.75.
    strategy = central_dp()
    updates = [SiteUpdate(f"s{i}", zeros(5000), 1) for i in range(4)]
    draws = np.concatenate(
        [strategy.aggregate(zeros(5000), updates)["w"] for _ in range(4)]
    )
    assert abs(draws.std() / 0.75 - 1) < 0.15
    assert abs(draws.mean()) < 0.05


def test_fixed_denominator_when_sites_drop_out() -> None:
    # 2 of the 4 expected sites send delta 1, and the mean divides by 4.
    strategy = central_dp(noise_multiplier=1e-9, clip_norm=10.0)
    updates = [SiteUpdate(s, {"w": np.ones(1, np.float32)}, 50) for s in "ab"]
    result = strategy.aggregate(zeros(1), updates)
    assert result["w"][0] == pytest.approx(0.5, abs=1e-6)
    assert strategy.uniform_weighting


def test_clips_each_site_before_summing() -> None:
    # (3, 4) clipped to norm 2 is (1.2, 1.6); (0, 1) is within the bound.
    strategy = central_dp(noise_multiplier=1e-9, sites_per_round=2)
    updates = [
        SiteUpdate("a", {"w": np.array([3.0, 4.0], np.float32)}, 1),
        SiteUpdate("b", {"w": np.array([0.0, 1.0], np.float32)}, 1),
    ]
    result = strategy.aggregate(zeros(2), updates)
    np.testing.assert_allclose(result["w"], [0.6, 1.3], atol=1e-6)
    assert strategy.site_settings() == {"clip_norm": 2.0}


def test_rejects_more_sites_than_per_round() -> None:
    strategy = central_dp(sites_per_round=2)
    updates = [SiteUpdate(s, zeros(1), 1) for s in "abc"]
    with pytest.raises(
        AggregationError, match=r"3 sites sent updates, .* sites_per_round=2"
    ):
        strategy.aggregate(zeros(1), updates)


@pytest.mark.parametrize(
    ("mechanism", "reference"), [("rdp", RDPAccountant), ("prv", PRVAccountant)]
)
def test_epsilon_matches_opacus(mechanism: str, reference: type) -> None:
    strategy = central_dp(accountant=mechanism, target_delta=1e-5)
    assert strategy.epsilon() == 0.0
    updates = [SiteUpdate(f"s{i}", zeros(3), 1) for i in range(4)]
    expected = reference()
    for _ in range(5):
        strategy.aggregate(zeros(3), updates)
        expected.step(noise_multiplier=1.5, sample_rate=0.4)
    assert strategy.epsilon() == pytest.approx(expected.get_epsilon(delta=1e-5))
    assert strategy.history() == [(1.5, 0.4, 5)]


@pytest.mark.parametrize(
    ("noise_multiplier", "total_sites", "rounds", "expected"),
    [
        # Values from Opacus 1.6's RDPAccountant at delta 1e-5.
        (1.0, 4, 10, 19.0536),
        (1.5, 10, 20, 7.4294),
    ],
)
def test_epsilon_golden_values(
    noise_multiplier: float, total_sites: int, rounds: int, expected: float
) -> None:
    strategy = central_dp(noise_multiplier=noise_multiplier, total_sites=total_sites)
    updates = [SiteUpdate(f"s{i}", zeros(1), 1) for i in range(4)]
    for _ in range(rounds):
        strategy.aggregate(zeros(1), updates)
    assert strategy.epsilon() == pytest.approx(expected, abs=1e-3)


def test_adaptive_clipping_moves_clip_norm() -> None:
    # All 4 sites are below C = 2, so the noisy fraction is about 1 and
    # C becomes 2 * exp(-0.2 * (1 - 0.5)) = 1.8097.
    strategy = central_dp(
        noise_multiplier=0.01,
        clip_count_stddev=0.01,
        adaptive_clipping=True,
        target_quantile=0.5,
        clip_learning_rate=0.2,
    )
    updates = [
        SiteUpdate(f"s{i}", {"w": np.full(1, 0.1, np.float32)}, 1) for i in range(4)
    ]
    strategy.aggregate(zeros(1), updates)
    assert strategy.clip_norm == pytest.approx(2 * math.exp(-0.1), rel=1e-3)
    assert strategy.site_settings()["clip_norm"] == strategy.clip_norm


def test_adaptive_clipping_grows_when_all_clipped() -> None:
    strategy = central_dp(
        noise_multiplier=0.01, clip_count_stddev=0.01, adaptive_clipping=True
    )
    updates = [
        SiteUpdate(f"s{i}", {"w": np.full(1, 50.0, np.float32)}, 1) for i in range(4)
    ]
    strategy.aggregate(zeros(1), updates)
    assert strategy.clip_norm == pytest.approx(2 * math.exp(0.1), rel=1e-3)


def test_adaptive_clipping_noise_split() -> None:
    # sigma = 1, count stddev = 1: (1 - (2 * 1)^-2)^-1/2 = (0.75)^-1/2.
    strategy = central_dp(
        noise_multiplier=1.0, clip_count_stddev=1.0, adaptive_clipping=True
    )
    assert strategy.delta_noise_multiplier == pytest.approx(0.75**-0.5)


def test_adaptive_clipping_rejects_small_count_noise() -> None:
    with pytest.raises(
        ConfigError, match=r"clip_count_stddev > noise_multiplier / 2 = 0.75, got 0.5"
    ):
        central_dp(adaptive_clipping=True, clip_count_stddev=0.5)


def test_adaptive_clipping_from_sums() -> None:
    strategy = central_dp(
        noise_multiplier=0.01, clip_count_stddev=0.01, adaptive_clipping=True
    )
    summed = UpdateSum(
        delta={"w": np.zeros(1)},
        weight_total=4.0,
        site_count=4,
        extras={CLIP_INDICATOR: {"below": np.array([4.0])}},
    )
    strategy.aggregate_sum(zeros(1), summed)
    assert strategy.clip_norm == pytest.approx(2 * math.exp(-0.1), rel=1e-3)
    missing = UpdateSum(delta={"w": np.zeros(1)}, weight_total=4.0, site_count=4)
    with pytest.raises(AggregationError, match=r"'clip_indicator' with tensor 'below'"):
        strategy.aggregate_sum(zeros(1), missing)


def test_state_round_trip_keeps_accountant_and_clip() -> None:
    strategy = central_dp(
        adaptive_clipping=True, noise_multiplier=1.0, clip_count_stddev=1.0
    )
    updates = [SiteUpdate(f"s{i}", {"w": np.ones(2, np.float32)}, 1) for i in range(4)]
    for _ in range(3):
        strategy.aggregate(zeros(2), updates)
    state = dict(load_safetensors(save_safetensors(strategy.state_dict())))
    assert set(state) == {"central_dp/accountant_history", "central_dp/clip_norm"}

    restored = central_dp(
        adaptive_clipping=True, noise_multiplier=1.0, clip_count_stddev=1.0
    )
    restored.load_state_dict(state)
    assert restored.epsilon() == pytest.approx(strategy.epsilon())
    assert restored.clip_norm == strategy.clip_norm


def test_state_rejects_malformed_history() -> None:
    strategy = central_dp()
    state = {
        "central_dp/accountant_history": np.zeros((2, 2)),
        "central_dp/clip_norm": np.array([1.0]),
    }
    with pytest.raises(AggregationError, match=r"accountant_history of shape \[2, 2\]"):
        strategy.load_state_dict(state)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"clip_norm": 0.0}, "clip_norm must be > 0.0, got 0.0"),
        ({"noise_multiplier": 0}, "noise_multiplier must be > 0.0, got 0"),
        (
            {"sites_per_round": 11},
            "sites_per_round must be <= total_sites \\(10\\), got 11",
        ),
        ({"target_delta": 1.0}, "target_delta must be < 1.0, got 1.0"),
        (
            {"accountant": "gdp"},
            "accountant must be one of \\['rdp', 'prv'\\], got 'gdp'",
        ),
        ({"adaptive_clipping": "yes"}, "adaptive_clipping must be true or false"),
        ({"noise_key": 7}, "noise_key must be 32 bytes, got int; leave it out"),
        ({"noise_key": bytes(8)}, "noise_key must be 32 bytes, got 8 bytes"),
    ],
)
def test_rejects_invalid_parameter(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        central_dp(**params)


def test_noise_differs_between_services_without_key() -> None:
    # Without a key each service draws its own from the operating system, so
    # two services releasing the same sum add different noise.
    def released() -> np.ndarray:
        strategy = central_dp(noise_key=None)
        updates = [SiteUpdate(f"s{i}", zeros(50), 1) for i in range(4)]
        return strategy.aggregate(zeros(50), updates)["w"]

    assert not np.array_equal(released(), released())


def test_rejects_inner_robust_rule() -> None:
    median = get_wrapper("median", get_strategy("fedavg"))
    with pytest.raises(
        ConfigError, match="central_dp and median each combine the updates"
    ):
        get_wrapper(
            "central_dp",
            median,
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "total_sites": 3},
        )


def test_rejects_inner_scaffold() -> None:
    scaffold = get_strategy("scaffold", {"total_sites": 3})
    with pytest.raises(ConfigError, match="central_dp cannot wrap scaffold"):
        get_wrapper(
            "central_dp",
            scaffold,
            {"clip_norm": 1.0, "noise_multiplier": 1.0, "total_sites": 3},
        )
