"""Update codecs, registered by name (see ``base.Codec``)."""

from medfed.contract.codecs import fp32, masked
from medfed.contract.codecs.base import CODECS, Codec, TensorSpec, get_codec

__all__ = ["CODECS", "Codec", "TensorSpec", "fp32", "get_codec", "masked"]
