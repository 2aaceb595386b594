"""Site selection per round and buffered asynchronous aggregation."""

import math
from collections import Counter

import numpy as np
import pytest

from medfed.aggregation.asynchronous import BufferedAggregator, staleness_weight
from medfed.aggregation.selection import select_sites
from medfed.aggregation.strategies import SiteUpdate, get_strategy
from medfed.errors import AggregationError, ConfigError, QuorumError

SITES = [f"site-{index}" for index in range(10)]


def test_selection_is_deterministic_by_seed_and_round() -> None:
    first = select_sites(SITES, None, 3, fraction=0.3, seed=11)
    again = select_sites(list(reversed(SITES)), None, 3, fraction=0.3, seed=11)
    assert first == again
    assert len(first) == 3
    assert first == sorted(first)
    rounds = {
        tuple(select_sites(SITES, None, r, fraction=0.3, seed=11)) for r in range(20)
    }
    assert len(rounds) > 1


def test_selection_count_uses_ceiling_and_minimum() -> None:
    assert len(select_sites(SITES, None, 0, fraction=0.25)) == 3
    assert len(select_sites(SITES, None, 0, fraction=0.1, minimum=4)) == 4
    assert select_sites(SITES, None, 0, fraction=1.0) == sorted(SITES)


def test_weighted_selection_prefers_large_sites() -> None:
    counts = {site: 10 for site in SITES}
    counts["site-0"] = 900
    counts["site-9"] = 0
    tally: Counter[str] = Counter()
    for round_number in range(300):
        tally.update(
            select_sites(SITES, counts, round_number, fraction=0.1, weighted=True)
        )
    assert tally["site-9"] == 0
    # site-0 has 900 of 980 samples, so it is chosen in about 92% of rounds.
    assert tally["site-0"] > 250


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"fraction": 0.0}, ConfigError, "fraction must be > 0.0, got 0.0"),
        ({"minimum": 0}, ConfigError, "minimum must be >= 1, got 0"),
        ({"minimum": 11}, QuorumError, "needs at least 11 sites, but only 10"),
        ({"weighted": True}, ConfigError, "needs the sites' sample counts"),
        ({"seed": -1}, ConfigError, "seed must be >= 0, got -1"),
    ],
)
def test_selection_rejects_invalid_input(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        select_sites(SITES, None, 0, **kwargs)  # type: ignore[arg-type]


def test_weighted_selection_rejects_too_few_sites_with_data() -> None:
    counts = {site: 0 for site in SITES}
    counts["site-1"] = 5
    with pytest.raises(QuorumError, match="needs 2 sites with data, but only 1"):
        select_sites(SITES, counts, 0, fraction=0.2, weighted=True)


def test_selection_rejects_duplicate_site() -> None:
    with pytest.raises(ConfigError, match=r"sites \['a'\] are listed more than once"):
        select_sites(["a", "b", "a"], None, 0)


def scalar(value: float) -> dict[str, np.ndarray]:
    return {"w": np.array([value], np.float32)}


def test_staleness_weight_values() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert staleness_weight(3, exponent=1.0) == pytest.approx(0.25)


def test_buffered_aggregation_by_hand() -> None:
    aggregator = BufferedAggregator(get_strategy("fedavg"), scalar(0.0), buffer_size=2)

    assert not aggregator.submit(SiteUpdate("a", scalar(1.0), 1), base_version=0)
    assert aggregator.buffered == 1
    # Both fresh: mean (1 + 3) / 2 = 2.
    assert aggregator.submit(SiteUpdate("b", scalar(3.0), 1), base_version=0)
    assert aggregator.version == 1
    assert aggregator.weights["w"][0] == pytest.approx(2.0)

    # "c" trained from version 0 (staleness 1): 4 / sqrt(2); "a" is fresh.
    assert not aggregator.submit(SiteUpdate("c", scalar(4.0), 1), base_version=0)
    assert aggregator.submit(SiteUpdate("a", scalar(1.0), 1), base_version=1)
    expected = 2.0 + (4.0 / math.sqrt(2) + 1.0) / 2
    assert aggregator.weights["w"][0] == pytest.approx(expected, rel=1e-6)
    assert aggregator.version == 2


def test_buffered_aggregation_rejects_too_stale() -> None:
    aggregator = BufferedAggregator(
        get_strategy("fedavg"), scalar(0.0), buffer_size=1, max_staleness=1
    )
    for _ in range(3):
        aggregator.submit(
            SiteUpdate("a", scalar(1.0), 1), base_version=aggregator.version
        )
    assert not aggregator.submit(SiteUpdate("b", scalar(9.0), 1), base_version=0)
    assert aggregator.version == 3
    assert aggregator.buffered == 0


def test_buffered_aggregation_rejects_future_version() -> None:
    aggregator = BufferedAggregator(get_strategy("fedavg"), scalar(0.0), buffer_size=2)
    with pytest.raises(
        AggregationError, match=r"from version 4, but the latest .* is 0"
    ):
        aggregator.submit(SiteUpdate("a", scalar(1.0), 1), base_version=4)
