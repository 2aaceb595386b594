"""Error feedback carries the codec's error exactly and persists it atomically."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file, save_file

from medfed.contract.codecs import get_codec
from medfed.contract.wire import decode_envelope, encode_envelope
from medfed.errors import ConfigError, DataError
from medfed.sites.error_feedback import RESIDUAL_FILE_NAME, ErrorFeedback

LOSSY = [
    ("fp16", {}),
    ("int8", {"chunk_size": 4, "seed": 3}),
    ("topk", {"fraction": 0.1}),
    ("topk", {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": "int8"}),
    ("topk", {"fraction": 0.3, "index_encoding": "bitmap", "value_dtype": "float16"}),
    ("randk", {"fraction": 0.2}),
    ("randk", {"fraction": 0.2, "rescale": False}),
    ("lowbit", {"bits": 2, "seed": 5}),
    ("lowbit", {"bits": 4, "chunk_size": 3}),
]

tensors = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=8),
    elements=st.floats(-100, 100, width=32),
)


def specs_of(update):
    return [(key, np.shape(value), "float32") for key, value in update.items()]


def bits(array):
    return np.asarray(array, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize(("name", "params"), LOSSY)
@given(first=tensors, second_scale=st.floats(-2, 2))
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_residual_carried_bit_exactly(
    tmp_path_factory, name, params, first, second_scale
):
    state_dir = tmp_path_factory.mktemp("site")
    feedback = ErrorFeedback(get_codec(name, params), state_dir=state_dir)
    updates = [
        {"w": first},
        {"w": (first * np.float32(second_scale)).astype(np.float32)},
    ]
    residual_before = np.zeros(first.shape, dtype=np.float32)
    for update in updates:
        payload = feedback.encode(update)
        feedback.commit()
        decoded = get_codec(name, feedback.params).decode(payload, specs_of(update))
        residual_after = load_file(state_dir / RESIDUAL_FILE_NAME)["w"]
        expected = np.asarray(update["w"] + residual_before) - decoded["w"]
        assert residual_after.shape == first.shape
        assert np.array_equal(bits(residual_after), bits(expected))
        residual_before = residual_after


def test_residual_survives_restart(tmp_path):
    update = {"w": np.linspace(-1, 1, 100, dtype=np.float32)}
    first = ErrorFeedback(get_codec("topk", {"fraction": 0.05}), state_dir=tmp_path)
    first.encode(update)
    first.commit()
    stored = load_file(tmp_path / RESIDUAL_FILE_NAME)["w"]
    second = ErrorFeedback(get_codec("topk", {"fraction": 0.05}), state_dir=tmp_path)
    assert np.array_equal(second.load_residual(update)["w"], stored)
    # The five largest values were sent, so the residual is the rest.
    assert np.count_nonzero(stored) == 95


def test_topk_error_feedback_sends_everything_eventually(tmp_path):
    update = {"w": np.arange(1, 11, dtype=np.float32)}
    feedback = ErrorFeedback(get_codec("topk", {"fraction": 0.1}), state_dir=tmp_path)
    codec = get_codec("topk", {"fraction": 0.1})
    sent = np.zeros(10, dtype=np.float32)
    for _ in range(100):
        payload = feedback.encode(update)
        feedback.commit()
        sent += codec.decode(payload, specs_of(update))["w"]
    residual = feedback.load_residual(update)["w"]
    # What was sent plus what is held equals everything the site had.
    assert np.allclose(sent + residual, 100 * update["w"], rtol=1e-5)
    assert (sent > 0).all()


def test_topk_int8_residual_holds_rounding_error(tmp_path):
    """The residual is the whole error: the dropped values, and on the kept
    positions the int8 rounding error of the sent values."""
    params = {"fraction": 0.25, "index_encoding": "bitmap", "value_dtype": "int8"}
    update = {"w": np.linspace(-1, 1, 40, dtype=np.float32) ** 3}
    feedback = ErrorFeedback(
        get_codec("topk", params | {"seed": 2}), state_dir=tmp_path
    )
    payload = feedback.encode(update)
    feedback.commit()
    residual = load_file(tmp_path / RESIDUAL_FILE_NAME)["w"]
    kept = np.unpackbits(payload["w.bitmap"], count=40, bitorder="little").astype(bool)
    scale = payload["w.scale"][0]
    sent = payload["w.values"].astype(np.float32) * scale

    assert np.array_equal(bits(residual[~kept]), bits(update["w"][~kept]))
    assert np.array_equal(bits(residual[kept]), bits(update["w"][kept] - sent))
    assert (np.abs(residual[kept]) < scale).all()
    # Stochastic rounding leaves some error on the kept values.
    assert np.count_nonzero(residual[kept]) > 0


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("topk", {"fraction": 0.1, "index_encoding": "bitmap", "value_dtype": "int8"}),
        ("lowbit", {"bits": 2, "chunk_size": 16}),
    ],
)
def test_error_feedback_sends_total_update(tmp_path, name, params):
    """What the rounds sent plus the residual held is the sum of the updates."""
    rng = np.random.default_rng(8)
    feedback = ErrorFeedback(get_codec(name, params | {"seed": 1}), state_dir=tmp_path)
    total = np.zeros(200)
    sent = np.zeros(200)
    for _ in range(30):
        update = {"w": rng.normal(0, 0.01, 200).astype(np.float32)}
        payload = feedback.encode(update)
        feedback.commit()
        sent += get_codec(name, feedback.params).decode(payload, specs_of(update))["w"]
        total += update["w"]
    residual = feedback.load_residual({"w": total})["w"]
    # Each round adds float32 rounding of about 1e-9 per element.
    # A residual that missed the rounding error of the sent values would be
    # off by up to one scale (over 1e-4 here) per element and round.
    assert np.allclose(sent + residual, total, rtol=0, atol=1e-6)


def test_encode_without_commit_keeps_residual(tmp_path):
    update = {"w": np.linspace(-1, 1, 50, dtype=np.float32)}
    feedback = ErrorFeedback(get_codec("topk", {"fraction": 0.1}), state_dir=tmp_path)
    feedback.encode(update)
    feedback.commit()
    stored = load_file(tmp_path / RESIDUAL_FILE_NAME)["w"]
    feedback.encode(update)
    assert np.array_equal(load_file(tmp_path / RESIDUAL_FILE_NAME)["w"], stored)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESIDUAL_FILE_NAME]


def test_commit_without_encode_rejected(tmp_path):
    feedback = ErrorFeedback(get_codec("fp16"), state_dir=tmp_path)
    with pytest.raises(ConfigError, match="no residual to commit: call encode first"):
        feedback.commit()


def test_error_feedback_in_envelope(tmp_path):
    update = {"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)}
    feedback = ErrorFeedback(get_codec("randk", {"fraction": 0.25}), state_dir=tmp_path)
    envelope = encode_envelope(
        update,
        study="study",
        round_number=2,
        site="site-a",
        sample_count=5,
        nonce="cd" * 8,
        codec=feedback,
    )
    feedback.commit()
    decoded = decode_envelope(envelope)
    residual = load_file(tmp_path / RESIDUAL_FILE_NAME)["w"]
    assert decoded.header.codec.name == "randk"
    assert "seed" in decoded.header.codec.params
    assert np.array_equal(bits(residual), bits(update["w"] - decoded.tensors["w"]))


def test_mismatched_residual_rejected(tmp_path):
    save_file({"w": np.zeros(3, np.float32)}, tmp_path / RESIDUAL_FILE_NAME)
    feedback = ErrorFeedback(get_codec("fp16"), state_dir=tmp_path)
    with pytest.raises(ConfigError) as caught:
        feedback.encode({"w": np.zeros(4, np.float32)})
    assert "tensor 'w' has shape [3] there and [4] in the update" in str(caught.value)
    assert "delete it to restart error feedback from zero" in str(caught.value)


def test_missing_residual_tensor_rejected(tmp_path):
    save_file({"w": np.zeros(3, np.float32)}, tmp_path / RESIDUAL_FILE_NAME)
    feedback = ErrorFeedback(get_codec("fp16"), state_dir=tmp_path)
    with pytest.raises(ConfigError, match="it has no tensor 'b'"):
        feedback.encode({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)})


def test_corrupt_residual_rejected(tmp_path):
    (tmp_path / RESIDUAL_FILE_NAME).write_bytes(b"not a safetensors file")
    feedback = ErrorFeedback(get_codec("fp16"), state_dir=tmp_path)
    with pytest.raises(DataError, match=r"is unreadable .*delete it to restart"):
        feedback.encode({"w": np.zeros(3, np.float32)})
