"""The compression config section: load-time validation and secagg checks."""

import pytest
import yaml
from pydantic import ValidationError

from medfed.contract.codecs import CompressionConfig
from medfed.errors import ConfigError


def test_default_is_fp32_without_zstd():
    config = CompressionConfig()

    assert config.codec == "fp32"
    assert config.envelope_compression == "none"
    assert config.build_codec().name == "fp32"


def test_yaml_section_loads():
    section = yaml.safe_load(
        """
        codec: topk
        params: {fraction: 0.01, value_dtype: float16}
        zstd: true
        """
    )
    config = CompressionConfig.model_validate(section)

    assert config.envelope_compression == "zstd"
    assert config.build_codec().params == {"fraction": 0.01, "value_dtype": "float16"}
    assert config.error_feedback is True


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"codec": "gzip"}, "unknown codec 'gzip'"),
        ({"codec": "topk"}, "codec 'topk' requires parameter fraction"),
        (
            {"codec": "topk", "params": {"fraction": "0.1"}},
            "parameter fraction must be a number, got '0.1'",
        ),
        (
            {"codec": "int8", "params": {"chunk_size": True}},
            "parameter chunk_size must be an integer, got True",
        ),
        ({"codec": "fp16", "level": 3}, "level"),
        ({"zstd": "maybe"}, "zstd"),
    ],
)
def test_invalid_section_rejected(section, message):
    with pytest.raises(ValidationError) as caught:
        CompressionConfig.model_validate(section)

    assert message in str(caught.value)


def test_masking_check_names_section():
    config = CompressionConfig(codec="topk", params={"fraction": 0.1})

    with pytest.raises(ConfigError) as caught:
        config.check("masking")

    message = str(caught.value)
    assert message.startswith("compression (codec 'topk'): codec 'topk' does not")
    assert "choose codec fp32" in message


def test_check_accepts_fp32_with_masking():
    CompressionConfig(zstd=True).check("masking")


def test_check_accepts_int8_without_secure_aggregation():
    CompressionConfig(codec="int8", params={"chunk_size": 256}).check("none")
