"""Which codec and secure aggregation pairs are accepted, and why others are not."""

import pytest

from medfed.contract.codecs import check_codec_compatibility
from medfed.errors import ConfigError

ACCEPTED = [
    ("fp32", "none", {}),
    ("fp16", "none", {}),
    ("int8", "none", {"chunk_size": 256}),
    ("topk", "none", {"fraction": 0.01}),
    ("randk", "none", {"fraction": 0.1}),
    ("fp32", "masking", {}),
    ("int8", "masking", {"scale": 0.01}),
    ("fp32", "ckks", {}),
]

REJECTED = [
    ("topk", "masking", {"fraction": 0.1}, "a mask is non-zero on every coordinate"),
    ("topk", "masking", {"fraction": 0.1}, "the sum of their sparse supports is wrong"),
    (
        "randk",
        "masking",
        {"fraction": 0.1},
        "choose codec int8 with a shared params.scale",
    ),
    (
        "int8",
        "masking",
        {},
        "per-tensor or per-chunk scales come from each site's data",
    ),
    ("int8", "masking", {"chunk_size": 64}, "set params.scale"),
    ("fp16", "masking", {}, "cannot be summed in the masking ring"),
    ("int8", "ckks", {"scale": 0.01}, "quantizing adds error and saves nothing"),
    ("fp16", "ckks", {}, "choose codec fp32"),
    ("topk", "ckks", {"fraction": 0.1}, "kept positions differ"),
    ("fp32", "paillier", {}, "unknown secure_aggregation 'paillier'"),
    ("topk", "none", {"fraction": 2}, "parameter fraction must be greater than 0.0"),
]


@pytest.mark.parametrize(("codec", "mode", "params"), ACCEPTED)
def test_compatible_pairs_accepted(codec, mode, params):
    check_codec_compatibility(codec, mode, params)


@pytest.mark.parametrize(("codec", "mode", "params", "message"), REJECTED)
def test_incompatible_pairs_rejected(codec, mode, params, message):
    with pytest.raises(ConfigError) as caught:
        check_codec_compatibility(codec, mode, params)
    assert message in str(caught.value)
