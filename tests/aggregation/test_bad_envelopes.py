"""Bad envelopes against the running aggregation service (uvicorn on 127.0.0.1).

Every bad envelope gets a 4xx with a message, and the round's accepted
uploads are unaffected: the round finalizes to the mean of exactly the
valid uploads.
"""

import functools
import hashlib
import itertools
import json
import struct
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_safetensors

from medfed.contract.wire import decode_envelope, encode_envelope
from medfed.flows.local import LocalAggregationService
from medfed.sites.client import AggregationClient

SITES = ["site-a", "site-b", "site-c"]
INITIAL = {"w": np.zeros((4, 6), np.float32), "b": np.zeros(3, np.float32)}
MAX_UPLOAD_BYTES = 100_000
PREFIX = struct.Struct(">4sBI")
_study_numbers = itertools.count()


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalAggregationService]:
    with LocalAggregationService(
        tmp_path_factory.mktemp("aggregation"), max_upload_bytes=MAX_UPLOAD_BYTES
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: LocalAggregationService) -> Iterator[AggregationClient]:
    with AggregationClient(service.url) as created:
        yield created


def new_study(client: AggregationClient) -> str:
    """Create a study with round 0 open for every site."""
    name = f"bad-envelopes-{next(_study_numbers)}"
    settings_json = json.dumps({"sites": SITES, "strategy": "fedavg"})
    client.create_study(
        name,
        save_safetensors(INITIAL, metadata={"medfed_study_settings": settings_json}),
    )
    client.open_round(name, 0, sites=SITES, quorum=2, deadline_seconds=600)
    return name


def make_envelope(study, site, seed, codec="int8", params=None, compression="zstd"):
    rng = np.random.default_rng(seed)
    update = {
        name: rng.normal(size=value.shape).astype(np.float32)
        for name, value in INITIAL.items()
    }
    return encode_envelope(
        update,
        study=study,
        round_number=0,
        site=site,
        sample_count=10 + seed,
        nonce=hashlib.sha256(f"{site}{seed}".encode()).hexdigest()[:32],
        codec_name=codec,
        codec_params=params if params is not None else {"chunk_size": 8},
        compression=compression,
    )


def split(envelope):
    _, _, length = PREFIX.unpack_from(envelope)
    header = json.loads(envelope[PREFIX.size : PREFIX.size + length])
    return header, envelope[PREFIX.size + length :]


def pack(header, payload, raw_length=None, *, fix_lengths=True):
    """Build an envelope, by default with consistent payload length and hash."""
    header = dict(header)
    if fix_lengths:
        header["payload_length"] = len(payload)
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        if raw_length is not None:
            header["uncompressed_length"] = raw_length
        elif header["compression"] == "none":
            header["uncompressed_length"] = len(payload)
    header_bytes = json.dumps(header).encode()
    return PREFIX.pack(b"MFED", 1, len(header_bytes)) + header_bytes + payload


def relabel(envelope, change, *, fix_lengths=True):
    header, payload = split(envelope)
    change(header)
    return pack(header, payload, fix_lengths=fix_lengths)


def bad_envelopes(study: str) -> dict[str, bytes]:
    """One bad envelope per kind, each for site-b of ``study``."""
    valid = make_envelope(study, "site-b", 2)
    raw_valid = make_envelope(study, "site-b", 2, compression="none")
    header, _ = split(valid)
    corrupted = bytearray(valid)
    corrupted[-1] ^= 0xFF
    return {
        "empty": b"",
        "random bytes": bytes(range(256)) * 4,
        "truncated prefix": valid[:6],
        "truncated header": valid[: PREFIX.size + 20],
        "truncated payload": valid[:-5],
        "appended bytes": valid + b"\x00",
        "payload hash mismatch": bytes(corrupted),
        "header length over limit": PREFIX.pack(b"MFED", 1, 2**32 - 1) + b"{}",
        "payload length over limit": relabel(
            valid, lambda h: h.update(payload_length=2**40), fix_lengths=False
        ),
        "wrong payload length": relabel(
            valid, lambda h: h.update(payload_length=10), fix_lengths=False
        ),
        "elements over limit": relabel(
            valid, lambda h: h["tensors"][0].update(shape=[2**16, 2**16])
        ),
        "zero-size huge dimension": relabel(
            valid, lambda h: h["tensors"][0].update(shape=[0, 2**62])
        ),
        "shape mismatch": relabel(
            valid, lambda h: h["tensors"][0].update(shape=[6, 4])
        ),
        "codec mismatch": relabel(
            valid, lambda h: h["codec"].update(name="fp16", params={})
        ),
        "unknown codec": relabel(valid, lambda h: h["codec"].update(name="gzip")),
        "invalid codec params": relabel(
            valid, lambda h: h["codec"].update(params={"chunk_size": -1})
        ),
        "compression mislabel": relabel(
            raw_valid, lambda h: h.update(compression="zstd")
        ),
        "zstd bomb": pack(header, zstd_bomb(), raw_length=1000),
        "wrong study": make_envelope("other-study", "site-b", 2),
        "wrong site": make_envelope(study, "site-c", 2),
        "body over upload limit": bytes(MAX_UPLOAD_BYTES + 1),
        "topk index out of range": _topk_out_of_range(study),
        "payload dtype NumPy lacks": pack(
            header, _bfloat16_payload(), raw_length=_BF16_RAW_LENGTH
        ),
    }


_BF16_TABLE = json.dumps(
    {"w.q": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}
).encode()
_BF16_RAW_LENGTH = 8 + len(_BF16_TABLE) + 8


def _bfloat16_payload() -> bytes:
    """A zstd safetensors payload whose one array is bfloat16."""
    raw = struct.pack("<Q", len(_BF16_TABLE)) + _BF16_TABLE + bytes(8)
    return zstandard.ZstdCompressor().compress(raw)


@functools.cache
def zstd_bomb() -> bytes:
    """A few kilobytes of zstd that decompress to 32 MiB of zeros."""
    return zstandard.ZstdCompressor(level=19).compress(bytes(32 * 1024 * 1024))


def _topk_out_of_range(study: str) -> bytes:
    valid = make_envelope(study, "site-b", 2, codec="topk", params={"fraction": 0.5})
    header, payload = split(valid)
    raw = zstandard.ZstdDecompressor().decompress(payload)
    length = struct.unpack("<Q", raw[:8])[0]
    table = json.loads(raw[8 : 8 + length])
    start, _ = table["w.indices"]["data_offsets"]
    data = bytearray(raw)
    data[8 + length + start : 8 + length + start + 4] = struct.pack("<i", 24)
    compressed = zstandard.ZstdCompressor().compress(bytes(data))
    return pack(header, compressed, raw_length=len(data))


def put(service: LocalAggregationService, study: str, site: str, body: bytes):
    return httpx.put(
        f"{service.url}/v1/studies/{study}/rounds/0/updates/{site}",
        content=body,
        timeout=60,
    )


def test_bad_envelopes_rejected_round_intact(service, client):
    study = new_study(client)
    first = make_envelope(study, "site-a", 1)
    client.upload(study, 0, "site-a", first)
    before = client.round_status(study, 0)

    for kind, body in bad_envelopes(study).items():
        response = put(service, study, "site-b", body)
        assert 400 <= response.status_code < 500, (kind, response.text)
        assert response.json()["detail"], kind
        # A bad envelope from a site that already uploaded must not replace
        # its accepted upload either.
        again = put(service, study, "site-a", body)
        assert 400 <= again.status_code < 500, (kind, again.text)

    status = client.round_status(study, 0)
    assert status["uploaded"] == before["uploaded"] == ["site-a"]
    assert status["state"] == "open"

    second = make_envelope(study, "site-b", 2)
    client.upload(study, 0, "site-b", second)
    finalized = client.finalize(study, 0, absent=["site-c"])
    model = client.download_model(study, finalized["result_version"])

    decoded = [decode_envelope(first), decode_envelope(second)]
    weights = np.array([update.header.sample_count for update in decoded], float)
    for name in INITIAL:
        stacked = np.stack([update.tensors[name] for update in decoded])
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(model.weights[name], expected, rtol=1e-5, atol=1e-6)
    assert finalized["state"] == "finalized"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("zstd bomb", "uncompressed_length is 1000 but"),
        ("payload hash mismatch", "payload_sha256 does not match"),
        ("codec mismatch", "payload is missing array 'b'"),
        ("unknown codec", "unknown codec 'gzip'"),
        ("zero-size huge dimension", "dimension above the limit"),
        ("topk index out of range", "contains an index outside [0, 24)"),
        ("shape mismatch", "has shape [4, 6], expected [6, 4]"),
        ("payload dtype NumPy lacks", "not a valid safetensors file: 'BF16'"),
    ],
)
def test_bad_envelope_message(service, client, kind, message):
    study = new_study(client)
    response = put(service, study, "site-b", bad_envelopes(study)[kind])
    assert response.status_code == 400
    assert message in response.json()["detail"]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cut=st.integers(0, 10_000),
    flip=st.integers(0, 10_000),
    mode=st.sampled_from(["truncate", "flip payload", "append", "random"]),
    noise=st.binary(min_size=1, max_size=64),
)
def test_mutated_envelopes_get_4xx(service, client, cut, flip, mode, noise):
    study = fuzz_study(client)
    valid = make_envelope(study, "site-b", 2)
    _, payload = split(valid)
    if mode == "truncate":
        body = valid[: cut % len(valid)]
    elif mode == "flip payload":
        data = bytearray(valid)
        position = len(valid) - len(payload) + flip % len(payload)
        data[position] ^= noise[0] or 1
        body = bytes(data)
    elif mode == "append":
        body = valid + noise
    else:
        body = noise
    response = put(service, study, "site-b", body)
    assert 400 <= response.status_code < 500, response.text
    assert client.round_status(study, 0)["uploaded"] == ["site-a"]


_fuzz_study: list[str] = []


def fuzz_study(client: AggregationClient) -> str:
    """One study for all fuzz examples, with site-a's valid upload in place."""
    if not _fuzz_study:
        study = new_study(client)
        client.upload(study, 0, "site-a", make_envelope(study, "site-a", 1))
        _fuzz_study.append(study)
    return _fuzz_study[0]
