"""Every decoder rejects a payload that does not match its header, naming the field."""

import tracemalloc

import numpy as np
import pytest

from medfed.contract.codecs import get_codec
from medfed.contract.codecs.params import kept_count
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
    ("topk", {"fraction": 0.25, "value_dtype": "int8"}),
    ("topk", {"fraction": 0.25, "index_encoding": "bitmap"}),
    ("topk", {"fraction": 0.25, "index_encoding": "bitmap", "value_dtype": "int8"}),
    ("randk", {"fraction": 0.25, "seed": 11}),
    ("lowbit", {"bits": 8}),
    ("lowbit", {"bits": 4, "chunk_size": 3}),
    ("lowbit", {"bits": 2}),
]
BITMAP = {"fraction": 0.25, "index_encoding": "bitmap"}


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


def test_topk_bitmap_rejects_wrong_length():
    codec, payload = encoded("topk", BITMAP)
    payload["w.bitmap"] = payload["w.bitmap"][:2]
    with pytest.raises(
        EnvelopeError, match=r"'w.bitmap' has shape \[2\], expected \[3\]"
    ):
        codec.decode(payload, SPECS)


def test_topk_bitmap_rejects_padding_bit():
    codec, payload = encoded("topk", BITMAP)
    payload["w.bitmap"] = payload["w.bitmap"].copy()
    # 20 elements use bits 0-3 of byte 2; bit 7 stands for element 23.
    payload["w.bitmap"][2] |= 0b10000000
    with pytest.raises(
        EnvelopeError, match=r"'w.bitmap' has a padding bit set after element 19"
    ):
        codec.decode(payload, SPECS)


def test_topk_bitmap_rejects_extra_set_bit():
    codec, payload = encoded("topk", BITMAP)
    bits = np.unpackbits(payload["w.bitmap"], count=20, bitorder="little")
    bits[np.flatnonzero(bits == 0)[0]] = 1
    payload["w.bitmap"] = np.packbits(bits, bitorder="little")
    with pytest.raises(
        EnvelopeError,
        match=r"'w.bitmap' marks 6 positions, expected 5 kept values for a tensor "
        r"of 20 elements",
    ):
        codec.decode(payload, SPECS)


def test_topk_bitmap_rejects_missing_set_bit():
    codec, payload = encoded("topk", BITMAP)
    bits = np.unpackbits(payload["w.bitmap"], count=20, bitorder="little")
    bits[np.flatnonzero(bits)[0]] = 0
    payload["w.bitmap"] = np.packbits(bits, bitorder="little")
    with pytest.raises(EnvelopeError, match=r"'w.bitmap' marks 4 positions"):
        codec.decode(payload, SPECS)


def test_topk_bitmap_checks_before_allocating():
    """A bitmap with the wrong count is rejected from its bytes alone,
    without the mask of one byte per element or the decoded tensor."""
    size = 2**23
    kept = kept_count(0.1, size)
    codec = get_codec("topk", {"fraction": 0.1, "index_encoding": "bitmap"})
    payload = {
        "w.bitmap": np.full(size // 8, 0xFF, np.uint8),
        "w.values": np.zeros(kept, np.float32),
    }
    tracemalloc.start()
    try:
        with pytest.raises(EnvelopeError, match=r"marks 8388608 positions"):
            codec.decode(payload, [("w", (size,), "float32")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 4


def test_topk_int8_rejects_level_out_of_range():
    codec, payload = encoded("topk", {"fraction": 0.25, "value_dtype": "int8"})
    payload["w.values"] = payload["w.values"].copy()
    payload["w.values"][0] = -128
    with pytest.raises(
        EnvelopeError, match=r"'w.values' contains a level outside \[-127, 127\]"
    ):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize("bad_scale", [-1.0, np.nan, np.inf])
def test_topk_int8_rejects_bad_scale(bad_scale):
    codec, payload = encoded("topk", {"fraction": 0.25, "value_dtype": "int8"})
    payload["w.scale"] = np.array([bad_scale], np.float32)
    with pytest.raises(
        EnvelopeError, match=r"'w.scale' contains a negative, NaN or infinite"
    ):
        codec.decode(payload, SPECS)


def test_topk_int8_rejects_two_scales():
    codec, payload = encoded("topk", {"fraction": 0.25, "value_dtype": "int8"})
    payload["w.scale"] = np.ones(2, np.float32)
    with pytest.raises(
        EnvelopeError, match=r"'w.scale' has shape \[2\], expected \[1\]"
    ):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize(("bits", "packed_bytes"), [(8, 20), (4, 10), (2, 5)])
def test_lowbit_rejects_wrong_packed_length(bits, packed_bytes):
    codec, payload = encoded("lowbit", {"bits": bits})
    assert payload["w.codes"].shape == (packed_bytes,)
    payload["w.codes"] = payload["w.codes"][:-1]
    with pytest.raises(
        EnvelopeError,
        match=rf"'w.codes' has shape \[{packed_bytes - 1}\], expected "
        rf"\[{packed_bytes}\]",
    ):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize(("bits", "padding_bit"), [(4, 4), (2, 6)])
def test_lowbit_rejects_padding_bit(bits, padding_bit):
    codec = get_codec("lowbit", {"bits": bits})
    payload = dict(codec.encode({"w": np.linspace(-1, 1, 7, dtype=np.float32)}))
    payload["w.codes"] = payload["w.codes"].copy()
    # 7 codes leave the top code slot of the last byte empty.
    payload["w.codes"][-1] |= np.uint8(1 << padding_bit)
    with pytest.raises(
        EnvelopeError, match=r"'w.codes' has a padding bit set after code 6"
    ):
        codec.decode(payload, [("w", (7,), "float32")])


@pytest.mark.parametrize(("bits", "all_ones"), [(8, 255), (4, 15), (2, 3)])
def test_lowbit_rejects_all_ones_code(bits, all_ones):
    codec, payload = encoded("lowbit", {"bits": bits})
    payload["w.codes"] = payload["w.codes"].copy()
    payload["w.codes"][0] |= np.uint8(all_ones)
    with pytest.raises(
        EnvelopeError, match=rf"'w.codes' contains the code {all_ones}, but"
    ):
        codec.decode(payload, SPECS)


@pytest.mark.parametrize("bad_scale", [-1.0, np.nan, np.inf])
def test_lowbit_rejects_bad_scale(bad_scale):
    codec, payload = encoded("lowbit", {"bits": 4, "chunk_size": 3})
    payload["w.scale"] = payload["w.scale"].copy()
    payload["w.scale"][2] = bad_scale
    with pytest.raises(
        EnvelopeError, match=r"'w.scale' contains a negative, NaN or infinite"
    ):
        codec.decode(payload, SPECS)


def test_lowbit_bits_come_from_header():
    """A 4-bit payload read as 2-bit has twice the bytes the header allows."""
    _, payload = encoded("lowbit", {"bits": 4})
    with pytest.raises(
        EnvelopeError, match=r"'w.codes' has shape \[10\], expected \[5\]"
    ):
        get_codec("lowbit", {"bits": 2}).decode(payload, SPECS)
