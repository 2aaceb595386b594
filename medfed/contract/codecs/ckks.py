"""The ckks codec: a site's update as CKKS ciphertexts, for the service to add.

A site encrypts its clipped, sample-weighted update with ``CkksEncryptor``,
which flattens it in ``VectorLayout`` order and encrypts it in chunks of
``poly_modulus_degree / 2`` values. Each serialized ciphertext travels as one
``uint8`` array named ``ciphertext-0000``, ``ciphertext-0001`` and so on. The
header lists the model's tensors as usual, so the service can check the
update's layout against the model without decrypting anything.

``CkksCodec.decode`` cannot return float32 tensors, because only the sites
hold the secret key. It checks the number, dtype and size of the ciphertext
arrays and returns them as they are. The service then loads them with
``medfed.contract.secagg.ckks.CkksAggregator``, which rejects any that is not
a fresh ciphertext under the study's parameters.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfed.contract.codecs.base import Codec, TensorSpec, register_codec, require_keys
from medfed.contract.secagg.ckks import CkksParameters, CkksSiteContext
from medfed.errors import ConfigError, EnvelopeError

__all__ = [
    "CkksCodec",
    "CkksEncryptor",
    "ciphertext_arrays",
    "ciphertext_name",
    "ciphertexts_from_arrays",
    "codec_params",
]


def ciphertext_name(index: int) -> str:
    """Return the payload array name of ciphertext ``index``."""
    return f"ciphertext-{index:04d}"


def ciphertext_arrays(chunks: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Wrap serialized ciphertexts as the ``uint8`` arrays of a payload."""
    return {
        ciphertext_name(index): np.frombuffer(chunk, dtype=np.uint8)
        for index, chunk in enumerate(chunks)
    }


def ciphertexts_from_arrays(arrays: Mapping[str, np.ndarray]) -> list[bytes]:
    """Return the serialized ciphertexts of ``ciphertext_arrays`` output, in order.

    Raises:
        EnvelopeError: the names are not ``ciphertext-0000`` onwards without
            a gap, or an array is not 1-D ``uint8``.
    """
    names = [ciphertext_name(index) for index in range(len(arrays))]
    require_keys(arrays, names)
    for name in names:
        if arrays[name].dtype != np.uint8 or arrays[name].ndim != 1:
            raise EnvelopeError(
                f"array {name!r} has dtype {arrays[name].dtype} and shape "
                f"{list(arrays[name].shape)}; a ciphertext is a 1-D uint8 array"
            )
    return [arrays[name].tobytes() for name in names]


def codec_params(parameters: CkksParameters) -> dict[str, Any]:
    """Return the header's codec parameters for ``parameters``."""
    return {
        "poly_modulus_degree": parameters.poly_modulus_degree,
        "coeff_mod_bit_sizes": ",".join(
            str(bits) for bits in parameters.coeff_mod_bit_sizes
        ),
        "scale_bits": parameters.scale_bits,
    }


@register_codec
class CkksCodec(Codec):
    """Carries CKKS ciphertexts; decoding yields them as ``uint8`` arrays.

    Args:
        poly_modulus_degree: the CKKS ring degree.
        coeff_mod_bit_sizes: the coefficient moduli in bits, comma-separated
            (``"60,60"``), because header parameters are scalars.
        scale_bits: the encoding scale ``2^scale_bits``.
    """

    name = "ckks"
    linear = True
    dense = True

    def __init__(
        self, *, poly_modulus_degree: int, coeff_mod_bit_sizes: str, scale_bits: int
    ) -> None:
        try:
            sizes = tuple(int(bits) for bits in str(coeff_mod_bit_sizes).split(","))
        except ValueError:
            raise ConfigError(
                "coeff_mod_bit_sizes must be comma-separated integers such as "
                f"'60,60', got {coeff_mod_bit_sizes!r}"
            ) from None
        self.parameters = CkksParameters(
            poly_modulus_degree=poly_modulus_degree,
            coeff_mod_bit_sizes=sizes,
            scale_bits=scale_bits,
        )

    @property
    def params(self) -> dict[str, Any]:
        return codec_params(self.parameters)

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise EnvelopeError(
            "the ckks codec cannot encrypt without a site's secret context; "
            "encode the update with CkksEncryptor"
        )

    def decode(
        self, payload: Mapping[str, np.ndarray], specs: list[TensorSpec]
    ) -> dict[str, np.ndarray]:
        values = sum(math.prod(shape) for _, shape, _ in specs)
        count = math.ceil(values / self.parameters.slot_count)
        names = [ciphertext_name(index) for index in range(count)]
        require_keys(payload, names)
        ciphertexts_from_arrays(payload)
        limit = self.parameters.max_ciphertext_bytes
        for name in names:
            array = payload[name]
            if array.size > limit:
                raise EnvelopeError(
                    f"payload array {name!r} has {array.size} bytes, more than the "
                    f"{limit} of a ciphertext with these parameters"
                )
        return {name: payload[name] for name in names}


class CkksEncryptor:
    """Encrypts a site's update for an envelope; the ``Encoder`` of ``ckks``.

    Args:
        context: the site's secret context.
        sample_count: the site's weight; the update is multiplied by it.
        clip: every value is first clipped to ``[-clip, clip]``.
    """

    name = "ckks"

    def __init__(
        self, context: CkksSiteContext, *, sample_count: int, clip: float
    ) -> None:
        self.context = context
        self.sample_count = sample_count
        self.clip = clip

    @property
    def params(self) -> dict[str, Any]:
        return codec_params(self.context.parameters)

    def encode(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return ciphertext_arrays(
            self.context.encrypt_update(
                update, sample_count=self.sample_count, clip=self.clip
            )
        )
