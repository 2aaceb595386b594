"""A site builds its update encoder from the compression config."""

import numpy as np
from safetensors.numpy import load_file

from medfed.contract.codecs import CompressionConfig
from medfed.contract.wire import decode_envelope, encode_envelope
from medfed.sites.compression import build_update_encoder
from medfed.sites.error_feedback import RESIDUAL_FILE_NAME, ErrorFeedback


def upload(encoder, update, compression):
    return encode_envelope(
        update,
        study="study",
        round_number=1,
        site="site-a",
        sample_count=8,
        nonce="ef" * 8,
        codec=encoder,
        compression=compression,
    )


def test_lossy_codec_gets_error_feedback(tmp_path):
    config = CompressionConfig(codec="topk", params={"fraction": 0.25}, zstd=True)
    encoder = build_update_encoder(config, state_dir=tmp_path)
    update = {"w": np.linspace(-1, 1, 40, dtype=np.float32)}

    envelope = upload(encoder, update, config.envelope_compression)
    assert isinstance(encoder, ErrorFeedback)
    encoder.commit()

    decoded = decode_envelope(envelope)
    residual = load_file(tmp_path / RESIDUAL_FILE_NAME)["w"]
    assert decoded.header.compression == "zstd"
    assert decoded.header.codec.name == "topk"
    assert np.array_equal(residual + decoded.tensors["w"], update["w"])


def test_error_feedback_can_be_disabled(tmp_path):
    config = CompressionConfig(codec="int8", error_feedback=False)
    encoder = build_update_encoder(config, state_dir=tmp_path)

    assert not isinstance(encoder, ErrorFeedback)
    assert encoder.name == "int8"


def test_fp32_gets_no_error_feedback(tmp_path):
    encoder = build_update_encoder(CompressionConfig(), state_dir=tmp_path)
    update = {"w": np.ones(3, np.float32)}

    decoded = decode_envelope(upload(encoder, update, "none"))

    assert not isinstance(encoder, ErrorFeedback)
    assert np.array_equal(decoded.tensors["w"], update["w"])
    assert not (tmp_path / RESIDUAL_FILE_NAME).exists()
