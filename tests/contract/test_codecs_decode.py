"""Every decoder rejects a payload that does not match its header, naming the field."""

import numpy as np
import pytest

from medfed.contract.codecs import get_codec
from medfed.errors import EnvelopeError

SPECS = [("w", (4, 5), "float32")]
UPDATE = {"w": np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)}

CODECS = [
    ("fp32", {}),
    ("fp16", {}),
    ("int8", {}),
    ("int8", {"chunk_size": 3}),
    ("int8", {"scale": 0.01}),
    ("topk", {"fraction": 0.25}),
    ("randk", {"fraction": 0.25, "seed": 11}),
]


def encoded(name, params):
    codec = get_codec(name, params)
    return codec, dict(codec.encode(UPDATE))


@pytest.mark.parametrize(("name", "params"), CODECS)
def test_decode_accepts_own_payload(name, params):
    codec, payload = encoded(name, params)
    decoded = codec.decode(payload, SPECS)
    assert decoded["w"].shape == (4, 5)
    assert decoded["w"].dtype == np.float32


@pytest.mark.parametrize(("name", "params"), CODECS)
def test_decode_rejects_missing_array(name, params):
    codec, payload = encoded(name, params)
    removed = sorted(payload)[0]
    del payload[removed]
    with pytest.raises(EnvelopeError, match=f"payload is missing array '{removed}'"):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize(("name", "params"), CODECS)
def test_decode_rejects_unexpected_array(name, params):
    codec, payload = encoded(name, params)
    payload["extra"] = np.zeros(1, np.float32)
    with pytest.raises(EnvelopeError, match="payload has unexpected array 'extra'"):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize(("name", "params"), CODECS)
def test_decode_rejects_wrong_shape(name, params):
    codec, payload = encoded(name, params)
    for key in payload:
        payload[key] = np.concatenate([payload[key].reshape(-1)] * 2)
    with pytest.raises(EnvelopeError, match=r"payload array '.*' has shape \[\d+\]"):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize(("name", "params"), CODECS)
def test_decode_rejects_wrong_dtype(name, params):
    codec, payload = encoded(name, params)
    for key in payload:
        payload[key] = payload[key].astype(np.float64)
    with pytest.raises(EnvelopeError, match=r"has dtype float64, expected"):
        codec.decode(payload, SPECS)


def test_decode_rejects_header_shape_mismatch():
    codec, payload = encoded("int8", {})
    with pytest.raises(
        EnvelopeError, match=r"'w.q' has shape \[4, 5\], expected \[5, 4\]"
    ):
        codec.decode(payload, [("w", (5, 4), "float32")])


def test_topk_rejects_index_out_of_range():
    codec, payload = encoded("topk", {"fraction": 0.25})
    payload["w.indices"] = payload["w.indices"].copy()
    payload["w.indices"][0] = 20
    with pytest.raises(
        EnvelopeError, match=r"'w.indices' contains an index outside \[0, 20\)"
    ):
        codec.decode(payload, SPECS)


def test_topk_rejects_negative_index():
    codec, payload = encoded("topk", {"fraction": 0.25})
    payload["w.indices"] = payload["w.indices"].copy()
    payload["w.indices"][0] = -1
    with pytest.raises(EnvelopeError, match=r"'w.indices' contains an index outside"):
        codec.decode(payload, SPECS)


def test_topk_rejects_duplicate_index():
    codec, payload = encoded("topk", {"fraction": 0.25})
    payload["w.indices"] = payload["w.indices"].copy()
    payload["w.indices"][1] = payload["w.indices"][0]
    with pytest.raises(EnvelopeError, match=r"'w.indices' contains a duplicate index"):
        codec.decode(payload, SPECS)


def test_int8_rejects_minus_128():
    codec, payload = encoded("int8", {})
    payload["w.q"] = payload["w.q"].copy()
    payload["w.q"][0, 0] = -128
    with pytest.raises(EnvelopeError, match=r"'w.q' contains -128"):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize("bad_scale", [-1.0, np.nan, np.inf])
def test_int8_rejects_bad_scale(bad_scale):
    codec, payload = encoded("int8", {"chunk_size": 3})
    payload["w.scale"] = payload["w.scale"].copy()
    payload["w.scale"][2] = bad_scale
    with pytest.raises(
        EnvelopeError, match=r"'w.scale' contains a negative, NaN or infinite"
    ):
        codec.decode(payload, SPECS)


def test_int8_scale_count_follows_chunk_size():
    _, payload = encoded("int8", {"chunk_size": 3})
    assert payload["w.scale"].shape == (7,)
    with pytest.raises(
        EnvelopeError, match=r"'w.scale' has shape \[7\], expected \[4\]"
    ):
        get_codec("int8", {"chunk_size": 5}).decode(payload, SPECS)
