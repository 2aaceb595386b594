"""The compression config section: load-time validation and secagg checks."""

import pytest
import yaml
from pydantic import ValidationError

from medfed.contract.codecs import CompressionConfig
from medfed.contract.config import parse_study_config
from medfed.errors import ConfigError

STUDY = {
    "study": "heart",
    "data": {"dataset": "heart_disease"},
    "sites": [{"id": f"site-{index}"} for index in range(4)],
    "model": {"name": "logistic_regression", "params": {"in_features": 15}},
    "training": {"rounds": 1, "learning_rate": 0.1},
}


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


def test_zstd_level_defaults_to_3():
    assert CompressionConfig(zstd=True).envelope_zstd_level == 3
    assert CompressionConfig(zstd=True, zstd_level=19).envelope_zstd_level == 19


def test_int8_step_rms_rejected_under_masking():
    config = CompressionConfig(codec="int8", params={"step_rms": 1.0})

    with pytest.raises(ConfigError, match="cannot be summed"):
        config.check("masking")


def test_topk_bitmap_int8_section_loads():
    section = yaml.safe_load(
        """
        codec: topk
        params: {fraction: 0.1, index_encoding: bitmap, value_dtype: int8}
        error_feedback: true
        """
    )
    config = CompressionConfig.model_validate(section)

    assert config.error_feedback is True
    assert config.build_codec().params == {
        "fraction": 0.1,
        "value_dtype": "int8",
        "index_encoding": "bitmap",
    }


def test_study_accepts_topk_bitmap_and_lowbit():
    for compression in (
        {
            "codec": "topk",
            "params": {
                "fraction": 0.1,
                "index_encoding": "bitmap",
                "value_dtype": "int8",
            },
            "error_feedback": True,
        },
        {"codec": "lowbit", "params": {"bits": 2, "chunk_size": 256}},
    ):
        config = parse_study_config(STUDY | {"compression": compression})

        assert config.compression.codec == compression["codec"]
        assert config.compression.params == compression["params"]


def test_study_rejects_lowbit_under_masking():
    raw = STUDY | {
        "secure_aggregation": "masking",
        "compression": {"codec": "lowbit", "params": {"bits": 4}},
    }

    with pytest.raises(ConfigError) as caught:
        parse_study_config(raw)

    message = str(caught.value)
    assert "compression (codec 'lowbit')" in message
    assert "choose int8 with a shared scale" in message


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"codec": "gzip"},
            "unknown codec 'gzip'; choose one of fp16, fp32, int8, lowbit, randk, topk",
        ),
        (
            {"codec": "masked"},
            "codec 'masked' is what secure_aggregation: masking sends, so set that "
            "mode instead",
        ),
        (
            {"codec": "ckks"},
            "codec 'ckks' is what secure_aggregation: ckks sends, so set that mode "
            "instead",
        ),
        ({"codec": "topk"}, "codec 'topk' requires parameter fraction"),
        (
            {"codec": "topk", "params": {"fraction": "0.1"}},
            "parameter fraction must be a number, got '0.1'",
        ),
        (
            {"codec": "int8", "params": {"chunk_size": True}},
            "parameter chunk_size must be an integer, got True",
        ),
        (
            {"codec": "topk", "params": {"fraction": 0.1, "index_encoding": "bits"}},
            "index_encoding must be one of int32, bitmap, got 'bits'",
        ),
        (
            {"codec": "lowbit", "params": {"bits": 1}},
            "parameter bits must be between 2 and 8, got 1",
        ),
        ({"codec": "fp16", "level": 3}, "level"),
        ({"zstd": "maybe"}, "zstd"),
        ({"zstd": True, "zstd_level": 23}, "less than or equal to 22"),
        ({"zstd": True, "zstd_level": 0}, "greater than or equal to 1"),
        ({"zstd_level": 19}, "zstd_level 19 is set but zstd is false: set zstd"),
        (
            {"zstd": True, "zstd_level": True},
            "zstd_level\n  Input should be a valid integer",
        ),
        (
            {"zstd": True, "zstd_level": "19"},
            "zstd_level\n  Input should be a valid integer",
        ),
        (
            {"zstd": True, "zstd_level": 3.0},
            "zstd_level\n  Input should be a valid integer",
        ),
        ({"zstd": "yes"}, "zstd\n  Input should be a valid boolean"),
        ({"zstd": 1}, "zstd\n  Input should be a valid boolean"),
        ({"error_feedback": "no"}, "error_feedback\n  Input should be a valid boolean"),
        (
            {"codec": "int8", "params": {"step_rms": 10**400}},
            "parameter step_rms must be greater than 0.0 and at most 127.0",
        ),
        (
            {"codec": "int8", "params": {"scale": "1e-3"}},
            "got '1e-3'; YAML reads a number in exponent form without a decimal "
            "point, such as 1e-3, as a string, so write 1.0e-3",
        ),
    ],
)
def test_invalid_section_rejected(section, message):
    with pytest.raises(ValidationError) as caught:
        CompressionConfig.model_validate(section)

    assert message in str(caught.value)


def test_quoted_decimal_has_no_yaml_hint():
    # Only an exponent without a decimal point is a number YAML reads as a
    # string; a quoted "0.1" was quoted on purpose.
    with pytest.raises(ValidationError) as caught:
        CompressionConfig(codec="int8", params={"scale": "0.1"})

    message = str(caught.value)
    assert "parameter scale must be a number, got '0.1'" in message
    assert "YAML" not in message


def test_masking_check_names_section():
    config = CompressionConfig(codec="topk", params={"fraction": 0.1})

    with pytest.raises(ConfigError) as caught:
        config.check("masking")

    message = str(caught.value)
    assert message.startswith("compression (codec 'topk'): codec 'topk' does not")
    assert "choose codec fp32" in message


def test_check_accepts_fp32_with_masking():
    CompressionConfig().check("masking")


@pytest.mark.parametrize("mode", ["masking", "ckks"])
@pytest.mark.parametrize("level", [None, 19])
def test_zstd_with_secure_aggregation_rejected(mode, level):
    # The masked and encrypted uploads skip zstd, so the setting would be
    # ignored without a word.
    config = CompressionConfig(zstd=True, zstd_level=level)

    with pytest.raises(ConfigError) as caught:
        config.check(mode)

    message = str(caught.value)
    assert f"compression.zstd is true, but secure_aggregation {mode!r}" in message
    assert "remove zstd and zstd_level" in message


def test_check_accepts_zstd_without_secure_aggregation():
    CompressionConfig(codec="int8", zstd=True, zstd_level=19).check("none")


def test_check_accepts_int8_without_secure_aggregation():
    CompressionConfig(codec="int8", params={"chunk_size": 256}).check("none")
