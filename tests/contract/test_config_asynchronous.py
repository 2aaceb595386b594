"""The ``round.asynchronous`` block of the study config and its rejections."""

from typing import Any

import pytest
import yaml

from medfed.contract.config import parse_study_config
from medfed.errors import ConfigError
from tests.conftest import CONFIGS


def heart_raw(**round_changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(
        (CONFIGS / "heart_disease_nodp.yaml").read_text()
    )
    raw.setdefault("round", {})["asynchronous"] = {"buffer_size": 2}
    raw["round"].update(round_changes)
    return raw


def test_asynchronous_block_parses() -> None:
    raw = heart_raw()
    raw["round"]["asynchronous"] = {
        "buffer_size": 3,
        "staleness_exponent": 1.0,
        "max_staleness": 4,
    }

    config = parse_study_config(raw)

    assert config.round.asynchronous is not None
    assert config.round.asynchronous.buffer_size == 3
    assert config.round.asynchronous.staleness_exponent == 1.0
    assert config.round.asynchronous.max_staleness == 4


def test_synchronous_by_default() -> None:
    raw = heart_raw()
    del raw["round"]["asynchronous"]

    assert parse_study_config(raw).round.asynchronous is None


def _with(raw: dict[str, Any], section: str, value: Any) -> dict[str, Any]:
    raw[section] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            heart_raw(asynchronous={"buffer_size": 5}),
            "buffer_size 5 exceeds the 4 sites of the study",
        ),
        (
            heart_raw(asynchronous={"buffer_size": 0}),
            "round.asynchronous.buffer_size: Input should be greater than or equal to 1",
        ),
        (
            heart_raw(asynchronous={"buffer_size": 2, "max_staleness": -1}),
            "round.asynchronous.max_staleness: Input should be greater than or equal to 0",
        ),
        (
            _with(heart_raw(), "secure_aggregation", "masking"),
            "masking secure aggregation sums a fixed cohort of sites per round",
        ),
        (
            _with(heart_raw(), "secure_aggregation", "ckks"),
            "ckks secure aggregation sums a fixed cohort of sites per round",
        ),
        (
            _with(heart_raw(), "strategy", {"name": "scaffold"}),
            "scaffold updates its control variates once per synchronous round",
        ),
        (
            _with(
                heart_raw(),
                "strategy",
                {
                    "name": "fedavg",
                    "wrappers": [
                        {
                            "name": "central_dp",
                            "params": {"noise_multiplier": 1.0, "clip_norm": 1.0},
                        }
                    ],
                },
            ),
            "central_dp accounts for a sample of sites per round",
        ),
        (
            heart_raw(participation={"fraction": 0.5}),
            "round.participation chooses sites per synchronous round",
        ),
        (heart_raw(quorum=2), "round.quorum applies to synchronous rounds"),
        (
            _with(
                heart_raw(),
                "strategy",
                {"name": "fedavg", "wrappers": [{"name": "krum", "params": {"f": 1}}]},
            ),
            "krum with f=1 needs at least 3 updates per version, more than "
            "buffer_size 2",
        ),
        (
            _with(
                heart_raw(),
                "strategy",
                {"name": "fedavg", "wrappers": [{"name": "multi_krum"}]},
            ),
            "multi_krum with f=1 needs at least 3 updates per version",
        ),
    ],
)
def test_asynchronous_conflicts_rejected(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_study_config(raw)

    assert message in str(raised.value)


def test_krum_with_large_buffer_parses() -> None:
    raw = _with(
        heart_raw(asynchronous={"buffer_size": 3}),
        "strategy",
        {"name": "fedavg", "wrappers": [{"name": "krum", "params": {"f": 1}}]},
    )

    config = parse_study_config(raw)

    assert config.round.asynchronous is not None
    assert config.round.asynchronous.buffer_size == 3
