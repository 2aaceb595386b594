import numpy as np
import pytest

from medfed.aggregation.strategies import SiteUpdate, get_strategy, weighted_mean
from medfed.errors import AggregationError, ConfigError


def test_fedavg_hand_computed() -> None:
    # Deltas 1, 4 and -2 weighted by 1, 2 and 1 samples: (1 + 8 - 2) / 4 = 1.75.
    updates = [
        SiteUpdate("a", {"w": np.array([1.0, 0.0], np.float32)}, 1),
        SiteUpdate("b", {"w": np.array([4.0, 2.0], np.float32)}, 2),
        SiteUpdate("c", {"w": np.array([-2.0, 4.0], np.float32)}, 1),
    ]
    result = get_strategy("fedavg").aggregate(
        {"w": np.array([10.0, 10.0], np.float32)}, updates
    )

    np.testing.assert_array_equal(result["w"], np.array([11.75, 12.0], np.float32))
    assert result["w"].dtype == np.float32


def test_weighted_mean_rejects_empty_round() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        weighted_mean([])


def test_weighted_mean_rejects_zero_samples() -> None:
    with pytest.raises(AggregationError, match="site 'a' reported sample_count 0"):
        weighted_mean([SiteUpdate("a", {"w": np.zeros(1, np.float32)}, 0)])


def test_unknown_strategy_lists_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown strategy 'fedmagic': choose one of .*fedavg"
    ):
        get_strategy("fedmagic")
