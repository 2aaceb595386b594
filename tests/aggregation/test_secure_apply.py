"""Strategies applied to the output of a masking round."""

from typing import ClassVar

import numpy as np
import pytest

from medfed.aggregation.secure import apply_weighted_sum
from medfed.aggregation.strategies import SiteUpdate, get_strategy
from medfed.aggregation.strategies.fedavg import FedAvg
from medfed.contract.secagg import FixedPointEncoding
from medfed.contract.secagg.local import run_masking_round
from medfed.errors import AggregationError, ConfigError


def test_fedavg_matches_plain_round():
    rng = np.random.default_rng(3)
    global_weights = {
        "bias": np.zeros(2, np.float32),
        "weight": rng.normal(size=(2, 3)).astype(np.float32),
    }
    updates = {
        f"site-{index}": {
            name: rng.normal(0, 0.1, value.shape).astype(np.float32)
            for name, value in global_weights.items()
        }
        for index in range(4)
    }
    counts = {"site-0": 10, "site-1": 200, "site-2": 35, "site-3": 90}
    encoding = FixedPointEncoding(
        fractional_bits=16, clip=1.0, max_weight=1000, site_count=4
    )
    outcome = run_masking_round(
        updates,
        counts,
        study="heart",
        round_number=1,
        threshold=3,
        encoding=encoding,
    )
    strategy = get_strategy("fedavg")

    secure = apply_weighted_sum(
        strategy,
        global_weights,
        outcome.result.weighted_sum,
        outcome.result.sample_count,
        site_count=len(outcome.result.survivors),
    )

    plain = strategy.aggregate(
        global_weights,
        [SiteUpdate(site, updates[site], counts[site]) for site in updates],
    )
    bound = encoding.error_bound(4) / sum(counts.values())
    for name in global_weights:
        assert secure[name].dtype == np.float32
        # Both results are rounded to float32, which may differ by one ulp.
        float32_ulp = np.spacing(np.abs(plain[name]).max())
        np.testing.assert_allclose(
            secure[name], plain[name], rtol=0, atol=bound + float32_ulp
        )


class _NeedsEachUpdate(FedAvg):
    name = "needs-each-update"
    needs_individual_updates: ClassVar[bool] = True


def test_individual_update_strategy_rejected():
    with pytest.raises(ConfigError) as error:
        apply_weighted_sum(
            _NeedsEachUpdate(),
            {"bias": np.zeros(1, np.float32)},
            np.zeros(1),
            1,
            site_count=1,
        )

    assert str(error.value) == (
        "strategy 'needs-each-update' needs each site's update, which secure "
        "aggregation does not release; choose a strategy that uses only the "
        "weighted mean, or secure_aggregation 'none'"
    )


def test_zero_sample_count_rejected():
    with pytest.raises(AggregationError) as error:
        apply_weighted_sum(
            FedAvg(), {"bias": np.zeros(1, np.float32)}, np.zeros(1), 0, site_count=1
        )

    assert str(error.value) == (
        "total sample_count of the securely aggregated sites is 0; it must be positive"
    )
