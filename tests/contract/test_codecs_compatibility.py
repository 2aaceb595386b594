"""Which codec and secure aggregation pairs are accepted, and why others are not."""

import numpy as np
import pytest

from medfed.contract.codecs import check_codec_compatibility, get_codec
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
    ("topk", "none", {"fraction": 0.1, "index_encoding": "bitmap"}),
    (
        "topk",
        "none",
        {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": "int8"},
    ),
    ("lowbit", "none", {"bits": 2}),
    ("lowbit", "none", {"bits": 4, "chunk_size": 256}),
]
BITMAP_INT8 = {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": "int8"}

REJECTED = [
    ("topk", "masking", {"fraction": 0.1}, "a mask is non-zero on every coordinate"),
    ("topk", "masking", {"fraction": 0.1}, "the sum of their sparse supports is wrong"),
    (
        "randk",
        "masking",
        {"fraction": 0.1},
        "choose codec fp32, or int8 with a shared scale",
    ),
    ("int8", "masking", {}, "each site picks those scales from its own data"),
    ("int8", "masking", {}, "set the shared scale instead"),
    ("int8", "masking", {"chunk_size": 64}, "with per-tensor or per-chunk scales"),
    ("int8", "masking", {"chunk_size": 64}, "(params: {scale: clip / 127})"),
    ("fp16", "masking", {}, "cannot be summed in the masking ring"),
    ("int8", "ckks", {"scale": 0.01}, "quantizing adds error and saves nothing"),
    ("fp16", "ckks", {}, "choose codec fp32"),
    ("topk", "ckks", {"fraction": 0.1}, "kept positions differ"),
    ("topk", "masking", BITMAP_INT8, "a mask is non-zero on every coordinate"),
    (
        "topk",
        "masking",
        {"fraction": 0.1, "value_dtype": "int8"},
        "choose codec fp32, or int8 with a shared scale",
    ),
    ("topk", "ckks", BITMAP_INT8, "kept positions differ"),
    ("lowbit", "masking", {"bits": 2}, "the sites' levels cannot be summed"),
    ("lowbit", "masking", {"bits": 4}, "4- or 2-bit levels would save no bytes"),
    (
        "lowbit",
        "masking",
        {"bits": 8, "chunk_size": 64},
        "choose int8 with a shared scale (params: {scale: clip / 127})",
    ),
    ("lowbit", "ckks", {"bits": 2}, "quantizing adds error and saves nothing"),
    ("lowbit", "none", {"bits": 5}, "parameter bits must be one of 8, 4, 2"),
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


def test_int8_shared_scale_sums_linearly():
    """With one scale, the sum of decodes is the decode of the integer sum,
    which is what lets int8 levels replace masking's fixed-point step."""
    specs = [("w", (50,), "float32")]
    rng = np.random.default_rng(3)
    codec = get_codec("int8", {"scale": 0.01, "seed": 1})
    payloads = [
        codec.encode({"w": rng.uniform(-1, 1, 50).astype(np.float32)}) for _ in range(5)
    ]
    integer_sum = sum(payload["w.q"].astype(np.int64) for payload in payloads)
    decoded_sum = sum(
        codec.decode(payload, specs)["w"].astype(np.float64) for payload in payloads
    )
    assert codec.linear
    # Each decode rounds q * scale to float32, about 1e-7 here.
    expected = integer_sum * np.float64(np.float32(0.01))
    assert np.allclose(expected, decoded_sum, rtol=0, atol=1e-6)
    assert not get_codec("int8", {"chunk_size": 8}).linear
