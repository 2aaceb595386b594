"""Fuzzing the envelope decoder: every bad envelope raises EnvelopeError.

Bad envelopes here are truncated, oversized (declared sizes over the limits),
mislabelled (the header disagrees with the payload), zstd bombs, or random
bytes. For each the decoder must raise ``EnvelopeError`` (never another
exception type), and ``tracemalloc`` shows it allocates no more than the
configured ``EnvelopeLimits`` allow, however large the declared sizes are.

Each property runs 150 examples; set MEDFED_FUZZ_EXAMPLES for a longer run.
"""

import hashlib
import json
import os
import re
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medfed.contract.wire import EnvelopeLimits, decode_envelope, encode_envelope
from medfed.errors import EnvelopeError

PREFIX = struct.Struct(">4sBI")
LIMITS = EnvelopeLimits(
    max_header_bytes=16 * 1024,
    max_payload_bytes=64 * 1024,
    max_uncompressed_bytes=256 * 1024,
    max_tensors=16,
    max_elements=32 * 1024,
)
# The decoder may hold the envelope, its payload, the decompressed bytes,
# the safetensors arrays and the decoded tensors at once: a few times the
# limits. A decoder that trusted a declared size would allocate gigabytes.
PEAK_BUDGET = 8 * (LIMITS.max_uncompressed_bytes + 4 * LIMITS.max_elements)

CODECS = [
    ("fp32", {}),
    ("fp16", {}),
    ("int8", {"chunk_size": 8}),
    ("int8", {"scale": 0.01}),
    ("int8", {"chunk_size": 8, "step_rms": 1.0}),
    ("topk", {"fraction": 0.2}),
    ("topk", {"fraction": 0.2, "index_encoding": "bitmap"}),
    ("topk", {"fraction": 0.2, "index_encoding": "bitmap", "value_dtype": "int8"}),
    ("topk", {"fraction": 0.2, "value_dtype": "int8"}),
    ("randk", {"fraction": 0.2}),
    ("lowbit", {"bits": 8}),
    ("lowbit", {"bits": 4, "chunk_size": 5}),
    ("lowbit", {"bits": 2}),
]
FUZZ = settings(
    max_examples=int(os.environ.get("MEDFED_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_envelope(codec="fp32", params=None, compression="none", shape=(4, 6)):
    rng = np.random.default_rng(0)
    update = {
        "w": rng.normal(size=shape).astype(np.float32),
        "b": np.array(0.5, np.float32),
    }
    return encode_envelope(
        update,
        study="study",
        round_number=3,
        site="site-a",
        sample_count=12,
        nonce="0123456789abcdef",
        codec_name=codec,
        codec_params=params,
        compression=compression,
    )


def split(envelope):
    _, _, length = PREFIX.unpack_from(envelope)
    header = json.loads(envelope[PREFIX.size : PREFIX.size + length])
    return header, envelope[PREFIX.size + length :]


def pack(header, payload, *, fix_lengths=True, raw_length=None):
    """Build an envelope, by default with consistent payload length and hash."""
    header = dict(header)
    if fix_lengths:
        header["payload_length"] = len(payload)
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        if raw_length is not None:
            header["uncompressed_length"] = raw_length
        elif header.get("compression", "none") == "none":
            header["uncompressed_length"] = len(payload)
    header_bytes = json.dumps(header).encode()
    return PREFIX.pack(b"MFED", 1, len(header_bytes)) + header_bytes + payload


def decode_measured(data, limits=LIMITS):
    """Decode ``data``; return the outcome and the peak traced allocation."""
    tracemalloc.start()
    try:
        try:
            outcome = decode_envelope(data, limits)
        except EnvelopeError as error:
            outcome = error
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, peak


def assert_rejected(data, message=None, limits=LIMITS, *, pattern=None):
    outcome, peak = decode_measured(data, limits)
    assert isinstance(outcome, EnvelopeError), f"accepted a bad envelope: {outcome}"
    if message is not None:
        assert message in str(outcome)
    if pattern is not None:
        assert re.search(pattern, str(outcome)), str(outcome)
    assert peak <= PEAK_BUDGET, f"peak allocation {peak} bytes"
    return outcome


@pytest.mark.parametrize(("codec", "params"), CODECS)
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_valid_envelope_decodes(codec, params, compression):
    outcome, peak = decode_measured(make_envelope(codec, params, compression))
    assert not isinstance(outcome, EnvelopeError), outcome
    assert outcome.tensors["w"].shape == (4, 6)
    assert outcome.tensors["b"].shape == ()
    assert peak <= PEAK_BUDGET


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_rejected(data):
    assert_rejected(data)


@FUZZ
@given(version=st.integers(0, 255), length=st.integers(0, 2**32 - 1), rest=st.binary())
def test_random_bytes_after_magic_rejected(version, length, rest):
    assert_rejected(PREFIX.pack(b"MFED", version, length) + rest)


@FUZZ
@given(
    codec=st.sampled_from(CODECS),
    compression=st.sampled_from(["none", "zstd"]),
    cut=st.floats(0, 1, exclude_max=True),
)
def test_truncated_envelope_rejected(codec, compression, cut):
    envelope = make_envelope(*codec, compression)
    assert_rejected(envelope[: int(cut * len(envelope))])


@FUZZ
@given(
    codec=st.sampled_from(CODECS),
    compression=st.sampled_from(["none", "zstd"]),
    position=st.floats(0, 1, exclude_max=True),
    value=st.integers(0, 255),
)
def test_byte_change_decodes_or_rejected(codec, compression, position, value):
    """A changed header byte may still be a valid header (a nonce digit), so
    the decoder either accepts the envelope or raises EnvelopeError."""
    envelope = bytearray(make_envelope(*codec, compression))
    envelope[int(position * len(envelope))] = value
    outcome, peak = decode_measured(bytes(envelope))
    assert peak <= PEAK_BUDGET
    if not isinstance(outcome, EnvelopeError):
        assert outcome.tensors["w"].shape == (4, 6)


@FUZZ
@given(
    codec=st.sampled_from(CODECS),
    compression=st.sampled_from(["none", "zstd"]),
    extra=st.binary(min_size=1, max_size=64),
)
def test_appended_bytes_rejected(codec, compression, extra):
    assert_rejected(make_envelope(*codec, compression) + extra, "payload_length")


def test_wrong_payload_length_rejected():
    header, payload = split(make_envelope())
    header["payload_length"] += 1
    assert_rejected(pack(header, payload, fix_lengths=False), "payload_length")


def test_payload_hash_mismatch_rejected():
    envelope = bytearray(make_envelope())
    envelope[-1] ^= 0xFF
    assert_rejected(bytes(envelope), "payload_sha256 does not match the payload")


MISLABELS = [
    ("shape", lambda h: h["tensors"][0].update(shape=[6, 4]), "has shape [4, 6]"),
    ("rank", lambda h: h["tensors"][0].update(shape=[24]), "has shape [4, 6]"),
    ("size", lambda h: h["tensors"][0].update(shape=[5, 6]), "expected [5, 6]"),
    ("name", lambda h: h["tensors"][0].update(name="v"), "missing array 'v.q'"),
    ("dtype", lambda h: h["tensors"][0].update(dtype="float16"), "tensors.0.dtype"),
    (
        "codec",
        lambda h: h["codec"].update(name="fp16", params={}),
        "payload is missing array 'b'",
    ),
    (
        "chunk_size",
        lambda h: h["codec"]["params"].update(chunk_size=5),
        "'w.scale' has shape [8], expected [5]",
    ),
    ("unknown codec", lambda h: h["codec"].update(name="gzip"), "unknown codec 'gzip'"),
    (
        "codec params",
        lambda h: h["codec"].update(params={"chunk_size": -1}),
        "parameter chunk_size must be between 0",
    ),
    (
        "missing param",
        lambda h: h["codec"].update(name="topk", params={}),
        "requires parameter fraction",
    ),
    (
        "unknown param",
        lambda h: h["codec"]["params"].update(level=3),
        "has no parameter 'level'",
    ),
    (
        # JSON allows integers beyond the float range, which float() rejects.
        "param beyond float",
        lambda h: h["codec"]["params"].update(step_rms=10**400),
        "parameter step_rms must be greater than 0.0 and at most 127.0",
    ),
    ("negative dim", lambda h: h["tensors"][0].update(shape=[-4, -6]), "negative size"),
    ("sample_count", lambda h: h.update(sample_count=0), "sample_count"),
    ("extra field", lambda h: h.update(note="hi"), "note"),
    ("version", lambda h: h.update(format_version=2), "format_version"),
    (
        "duplicate",
        lambda h: h["tensors"].append(h["tensors"][0]),
        "names a tensor twice",
    ),
    ("compression", lambda h: h.update(compression="zstd"), "zstd"),
    ("study", lambda h: h.update(study="../etc"), "study"),
]


@pytest.mark.parametrize(
    ("change", "message"),
    [(change, message) for _, change, message in MISLABELS],
    ids=[label for label, _, _ in MISLABELS],
)
def test_mislabelled_header_rejected(change, message):
    header, payload = split(make_envelope("int8", {"chunk_size": 3}))
    change(header)
    assert_rejected(pack(header, payload), message)


def test_sparse_codecs_take_shape_from_header():
    """A sparse payload carries flat positions only, so a relabelled shape
    with the same element count decodes. The aggregation service must check
    shapes against the global model."""
    header, payload = split(make_envelope("topk", {"fraction": 0.2}))
    header["tensors"][0]["shape"] = [6, 4]
    outcome, _ = decode_measured(pack(header, payload))
    assert outcome.tensors["w"].shape == (6, 4)


# Codecs with packed arrays (bitmaps, low-bit codes), whose bytes the fuzz
# test draws at random.
PACKED_CODECS = [
    ("topk", {"fraction": 0.2, "index_encoding": "bitmap"}, ".bitmap"),
    (
        "topk",
        {"fraction": 0.2, "index_encoding": "bitmap", "value_dtype": "int8"},
        ".bitmap",
    ),
    ("lowbit", {"bits": 4, "chunk_size": 5}, ".codes"),
    ("lowbit", {"bits": 2}, ".codes"),
]


@FUZZ
@given(codec=st.sampled_from(PACKED_CODECS), data=st.data())
def test_random_packed_bytes_decode_or_rejected(codec, data):
    """Random bytes in a bitmap, code or value array, at the declared length
    or one element short, decode or raise EnvelopeError within the budget."""
    name, params, suffix = codec
    header, payload = split(make_envelope(name, params))
    arrays = dict(load_safetensors(payload))
    # Sorted, because the safetensors reader returns arrays in no fixed order.
    for key in sorted(arrays):
        if key.endswith(suffix) or key.endswith(".values"):
            size = data.draw(st.sampled_from([arrays[key].size, arrays[key].size - 1]))
            raw = data.draw(st.binary(min_size=size * arrays[key].itemsize))
            arrays[key] = np.frombuffer(
                raw[: size * arrays[key].itemsize], arrays[key].dtype
            ).copy()
    outcome, peak = decode_measured(pack(header, save_safetensors(arrays)))
    assert peak <= PEAK_BUDGET
    if not isinstance(outcome, EnvelopeError):
        assert outcome.tensors["w"].shape == (4, 6)
        assert np.isfinite(outcome.tensors["w"]).all()


def test_bitmap_padding_bit_rejected():
    params = {"fraction": 0.2, "index_encoding": "bitmap", "value_dtype": "int8"}
    header, payload = split(make_envelope("topk", params))
    arrays = dict(load_safetensors(payload))
    # 24 elements fill 3 bytes, so the scalar "b" carries the padding: its
    # bitmap byte uses bit 0 and bits 1-7 must be zero.
    arrays["b.bitmap"] = arrays["b.bitmap"] | np.uint8(0b10)
    assert_rejected(
        pack(header, save_safetensors(arrays)),
        "'b.bitmap' has a padding bit set after element 0",
    )


def test_codec_swap_rejected():
    """An int8 payload labelled fp32 names the first array the codec misses."""
    header, payload = split(make_envelope("int8", {"chunk_size": 8}))
    header["codec"] = {"name": "fp32", "params": {}}
    assert_rejected(pack(header, payload), "payload is missing array")


PAYLOADS = [
    ("float64", {"w": np.zeros((4, 6)), "b": np.zeros(())}, "has dtype float64"),
    (
        "extra array",
        {"w": np.zeros((4, 6), "f4"), "b": np.zeros((), "f4"), "x": np.zeros(1, "f4")},
        "unexpected array 'x'",
    ),
    (
        "nan",
        {"w": np.full((4, 6), np.nan, "f4"), "b": np.zeros((), "f4")},
        "NaN or infinite",
    ),
    ("empty", {}, "missing array"),
]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [(arrays, message) for _, arrays, message in PAYLOADS],
    ids=[label for label, _, _ in PAYLOADS],
)
def test_mislabelled_payload_rejected(arrays, message):
    header, _ = split(make_envelope())
    assert_rejected(pack(header, save_safetensors(arrays)), message)


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3", "BOOL", "U16", "C64", "XX"])
def test_payload_dtype_numpy_lacks_rejected(dtype):
    body = json.dumps(
        {"w": {"dtype": dtype, "shape": [4], "data_offsets": [0, 8]}}
    ).encode()
    raw = struct.pack("<Q", len(body)) + body + bytes(8)
    header, _ = split(make_envelope())
    assert_rejected(pack(header, raw))


@FUZZ
@given(
    entries=st.dictionaries(
        st.sampled_from(["w", "b", "x"]),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "F16", "I8", "I32", "BF16", "U8"]),
                "shape": st.lists(st.integers(0, 2**40), max_size=3),
                "data_offsets": st.lists(st.integers(0, 2**40), min_size=2, max_size=2),
            }
        ),
        max_size=3,
    ),
    body=st.binary(max_size=256),
    codec=st.sampled_from(CODECS),
)
def test_random_safetensors_payload_rejected(entries, body, codec):
    table = json.dumps(entries).encode()
    raw = struct.pack("<Q", len(table)) + table + body
    header, _ = split(make_envelope(*codec))
    assert_rejected(pack(header, raw))


def test_header_length_over_limit_rejected():
    data = PREFIX.pack(b"MFED", 1, 2**32 - 1) + b"{}"
    assert_rejected(data, "header_length 4294967295 exceeds the limit")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("payload_length", 2**40, "payload_length 1099511627776 exceeds the limit"),
        ("uncompressed_length", 2**40, "uncompressed_length 1099511627776 exceeds"),
    ],
)
def test_declared_size_over_limit_rejected(field, value, message):
    header, payload = split(make_envelope())
    header[field] = value
    assert_rejected(pack(header, payload, fix_lengths=False), message)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (
            [2**15, 2**15],
            "declares 1073741825 tensor elements, more than the limit of 32768",
        ),
        ([2**20, 2**20], "with a dimension above the limit of 32768"),
        ([0, 2**62], "with a dimension above the limit"),
        ([10**30], "with a dimension above the limit"),
        ([2] * 9, "shape"),
    ],
)
def test_declared_shape_over_limit_rejected(shape, message):
    header, payload = split(make_envelope())
    header["tensors"][0]["shape"] = shape
    assert_rejected(pack(header, payload), message)


def test_too_many_tensors_rejected():
    header, payload = split(make_envelope())
    header["tensors"] = [{"name": f"t{i}", "shape": [1]} for i in range(17)]
    assert_rejected(pack(header, payload), "declares 17 tensors, more than the limit")


# A decoder may reject an oversized frame from its header, or stop reading one
# byte past the declared length; either message names the mismatch.
ZSTD_MISMATCH = r"uncompressed_length is \d+ but|failed zstd decompression"


@pytest.fixture(scope="module")
def zstd_bomb():
    """A ~3 KB zstd frame that decompresses to 64 MiB of zeros."""
    return zstandard.ZstdCompressor(level=19).compress(bytes(64 * 1024 * 1024))


@pytest.mark.parametrize("declared", [1000, 200 * 1024])
def test_zstd_bomb_with_content_size_rejected(zstd_bomb, declared):
    header, _ = split(make_envelope(compression="zstd"))
    data = pack(header, zstd_bomb, raw_length=declared)
    assert_rejected(data, pattern=ZSTD_MISMATCH)


def test_zstd_bomb_without_content_size_rejected():
    compressor = zstandard.ZstdCompressor(level=19, write_content_size=False)
    bomb = compressor.compress(bytes(64 * 1024 * 1024))
    header, _ = split(make_envelope(compression="zstd"))
    assert_rejected(pack(header, bomb, raw_length=1000), pattern=ZSTD_MISMATCH)


def test_zstd_frame_shorter_than_declared_rejected():
    header, payload = split(make_envelope(compression="zstd"))
    raw = zstandard.ZstdDecompressor().decompress(payload)
    short = zstandard.ZstdCompressor(write_content_size=False).compress(raw[:-10])
    data = pack(header, short, raw_length=len(raw))
    assert_rejected(data, f"uncompressed_length is {len(raw)} but the payload")


def test_zstd_trailing_data_rejected():
    header, payload = split(make_envelope(compression="zstd"))
    raw_length = header["uncompressed_length"]
    data = pack(
        header,
        payload + zstandard.ZstdCompressor().compress(b"x"),
        raw_length=raw_length,
    )
    assert_rejected(data, pattern=ZSTD_MISMATCH)


def test_zstd_label_on_raw_payload_rejected():
    header, payload = split(make_envelope(compression="none"))
    header["compression"] = "zstd"
    assert_rejected(pack(header, payload, raw_length=len(payload)), "zstd")


@FUZZ
@given(
    payload=st.binary(max_size=512),
    declared=st.integers(0, LIMITS.max_uncompressed_bytes),
)
def test_random_zstd_payload_rejected(payload, declared):
    header, _ = split(make_envelope(compression="zstd"))
    assert_rejected(pack(header, payload, raw_length=declared))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
HEADER_PATHS = [
    ("study",),
    ("round",),
    ("nonce",),
    ("codec",),
    ("codec", "name"),
    ("codec", "params"),
    ("codec", "params", "chunk_size"),
    ("codec", "params", "step_rms"),
    ("codec", "params", "bits"),
    ("codec", "params", "index_encoding"),
    ("codec", "params", "value_dtype"),
    ("compression",),
    ("tensors",),
    ("tensors", 0),
    ("tensors", 0, "name"),
    ("tensors", 0, "shape"),
    ("tensors", 0, "shape", 0),
    ("sample_count",),
    ("uncompressed_length",),
    ("signature",),
]


@FUZZ
@given(
    codec=st.sampled_from(CODECS), path=st.sampled_from(HEADER_PATHS), value=JSON_VALUES
)
def test_random_header_field_decodes_or_rejected(codec, path, value):
    header, payload = split(make_envelope(*codec))
    target = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    outcome, peak = decode_measured(pack(header, payload))
    assert peak <= PEAK_BUDGET
    if not isinstance(outcome, EnvelopeError):
        assert outcome.tensors["w"].dtype == np.float32


@FUZZ
@given(text=st.binary(max_size=300))
def test_random_header_bytes_rejected(text):
    _, payload = split(make_envelope())
    data = PREFIX.pack(b"MFED", 1, len(text)) + text + payload
    assert_rejected(data)
