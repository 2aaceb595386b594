"""Update codecs, registered by name (see ``base.Codec``).

Built in: ``fp32`` (lossless), ``fp16``, ``int8`` and ``lowbit`` (8, 4 or
2 bits, stochastic rounding), ``topk`` and ``randk`` (sparsification),
``masked``, which carries the ring elements of secure aggregation's masking
protocol, and ``ckks``, which carries CKKS ciphertexts. The
``secure_aggregation`` setting chooses the last two, not ``compression``.
``check_codec_compatibility`` rejects the codecs that do not compose with a
secure aggregation mode.
"""

from medfed.contract.codecs import (
    ckks,
    fp16,
    fp32,
    int8,
    lowbit,
    masked,
    randk,
    topk,
)
from medfed.contract.codecs.base import (
    CODECS,
    Codec,
    Encoder,
    TensorSpec,
    get_codec,
)
from medfed.contract.codecs.compatibility import (
    SECURE_AGGREGATION_MODES,
    check_codec_compatibility,
)
from medfed.contract.codecs.config import CompressionConfig

__all__ = [
    "CODECS",
    "SECURE_AGGREGATION_MODES",
    "Codec",
    "CompressionConfig",
    "Encoder",
    "TensorSpec",
    "check_codec_compatibility",
    "ckks",
    "fp16",
    "fp32",
    "get_codec",
    "int8",
    "lowbit",
    "masked",
    "randk",
    "topk",
]
