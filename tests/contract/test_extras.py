"""Extras groups inside an upload and published tensor groups."""

import numpy as np
import pytest

from medfed.contract.extras import (
    expected_upload_shapes,
    flatten_groups,
    pack_extras,
    scale_extras_for_masking,
    split_extras,
    unflatten_groups,
)
from medfed.errors import ConfigError

DELTA = {"linear.weight": np.ones((1, 3), np.float32), "linear.bias": np.zeros(1)}
CONTROL = {"linear.weight": np.full((1, 3), 2.0), "linear.bias": np.full(1, 3.0)}


def test_pack_and_split_round_trip() -> None:
    packed = pack_extras(DELTA, {"control_delta": CONTROL})
    assert sorted(packed) == [
        "extra/control_delta/linear.bias",
        "extra/control_delta/linear.weight",
        "linear.bias",
        "linear.weight",
    ]
    delta, extras = split_extras(packed)
    assert sorted(delta) == sorted(DELTA)
    assert list(extras) == ["control_delta"]
    np.testing.assert_array_equal(extras["control_delta"]["linear.bias"], [3.0])


def test_expected_shapes_match_packed_upload() -> None:
    packed = pack_extras(DELTA, {"control_delta": CONTROL})
    shapes = expected_upload_shapes(DELTA, ["control_delta"])
    assert shapes == {name: np.shape(value) for name, value in packed.items()}


@pytest.mark.parametrize("name", ["extra/", "extra/control_delta", "extra//w"])
def test_split_rejects_malformed_extra_name(name: str) -> None:
    with pytest.raises(ConfigError, match="is not of the form 'extra/<group>/<name>'"):
        split_extras({name: np.zeros(1)})


def test_pack_rejects_group_with_slash() -> None:
    with pytest.raises(ConfigError, match="contain no '/', got 'a/b'"):
        pack_extras(DELTA, {"a/b": CONTROL})


def test_masking_scale_undoes_sample_weight() -> None:
    scaled = scale_extras_for_masking({"control_delta": CONTROL}, 4)
    weighted = scaled["control_delta"]["linear.bias"] * 4
    np.testing.assert_allclose(weighted, [3.0])
    assert scaled["control_delta"]["linear.bias"].dtype == np.float32


def test_published_groups_round_trip() -> None:
    flat = flatten_groups({"control_variate": CONTROL})
    assert sorted(flat) == [
        "control_variate/linear.bias",
        "control_variate/linear.weight",
    ]
    groups = unflatten_groups(flat)
    np.testing.assert_array_equal(groups["control_variate"]["linear.bias"], [3.0])


def test_unflatten_rejects_name_without_group() -> None:
    with pytest.raises(ConfigError, match="'w' is not of the form '<group>/<name>'"):
        unflatten_groups({"w": np.zeros(1)})


def test_expected_shapes_reject_reserved_model_name() -> None:
    weights = {"extra/w": np.zeros(1), "w": np.zeros(1)}
    with pytest.raises(ConfigError, match=r"model tensors \['extra/w'\] start with"):
        expected_upload_shapes(weights, [])
