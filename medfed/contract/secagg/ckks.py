"""Secure aggregation with CKKS homomorphic encryption (TenSEAL).

All sites of a study share one CKKS context that contains the secret key;
it is distributed among the sites over a channel the aggregation service
cannot read. The service receives no key, so it can add ciphertexts but
cannot decrypt any of them. Each site clips and weights its flattened update
like the masking protocol does, splits it into chunks of ``slot_count``
values (``poly_modulus_degree / 2``) and encrypts each as a batched
``ts.ckks_vector``; the service adds the sites' chunks element-wise, and the
sites decrypt only the sum.

The service needs no context from the sites. ``CkksAggregator`` accepts
either ``public_bytes()`` or the study's ``CkksParameters``, from which it
builds a context and drops its secret key at once. Either way its context
has the study's parameters and no secret key, which is all that adding
ciphertexts needs.

A site releases a decrypted sum only after ``round_for_release`` has rounded
it to a grid much coarser than the decryption noise. The service stores the
ciphertext of that sum, and an exact CKKS decryption together with its
ciphertext reveals the secret key (Li and Micciancio, "On the Security of
Homomorphic Encryption on Approximate Numbers", Eurocrypt 2021).

Precision: CKKS is approximate. With the defaults (degree 8192, moduli
(60, 60) bits, scale 2^30) the largest error of a decrypted sum of 20 sites
measured about 4e-5 in weighted units (``tests/contract/test_secagg_ckks.py``
asserts below 1e-3). That is a measured figure, not a proven bound, and it
grows with the number of ciphertexts added. ``check_ckks_capacity`` keeps the
encoded sum below the ciphertext modulus, beyond which decryption returns
garbage.

Size: a fresh ciphertext holds two polynomials of ``poly_modulus_degree``
coefficients per data modulus (every modulus but the last, special one),
8 bytes each, so with one data modulus it costs 8 times the bytes of the
float32 values it carries when its slots are full.

TenSEAL is imported on first use; install it with the ``he`` extra.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.contract.secagg.layout import VectorLayout
from medfed.errors import ConfigError, SecureAggregationError

__all__ = [
    "CkksAggregator",
    "CkksParameters",
    "CkksSiteContext",
    "check_ckks_capacity",
    "round_for_release",
]

logger = logging.getLogger(__name__)

# The largest total coefficient modulus per degree that keeps 128-bit
# security, from the Homomorphic Encryption Security Standard (2018), as
# enforced by Microsoft SEAL.
_MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Bits kept free between the encoded sum and the modulus for encryption noise.
_NOISE_MARGIN_BITS = 4
_MAX_CIPHERTEXT_BYTES = 64 * 1024 * 1024
# Bytes a serialized ciphertext may take beyond its coefficients (the SEAL
# and protobuf headers measured about 150 with TenSEAL 0.3.18).
_CIPHERTEXT_HEADER_BYTES = 4096
# A released sum is rounded to multiples of 2^(margin - scale_bits). The
# decryption error of a sum of 20 sites measured about 2^-14.6 at scale 2^30,
# so with a margin of 20 bits the grid (2^-10) is about 24 times coarser.
_RELEASE_MARGIN_BITS = 20


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError:
        raise ConfigError(
            "secure_aggregation 'ckks' needs TenSEAL: install medfed with the "
            "'he' extra"
        ) from None
    return tenseal


@dataclass(frozen=True, kw_only=True)
class CkksParameters:
    """CKKS encryption parameters shared by every site of a study.

    Attributes:
        poly_modulus_degree: 4096, 8192, 16384 or 32768.
        coeff_mod_bit_sizes: the bit sizes of the coefficient moduli; the
            last is the special modulus, the others carry data. Additions
            need no rescaling, so one data modulus suffices.
        scale_bits: the encoding scale is ``2^scale_bits``.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = field(default=(60, 60))
    scale_bits: int = 30

    def __post_init__(self) -> None:
        degree = self.poly_modulus_degree
        if degree not in _MAX_MODULUS_BITS:
            raise ConfigError(
                "poly_modulus_degree must be one of "
                f"{sorted(_MAX_MODULUS_BITS)}, got {degree!r}"
            )
        sizes = self.coeff_mod_bit_sizes
        if len(sizes) < 2 or any(not 20 <= bits <= 60 for bits in sizes):
            raise ConfigError(
                "coeff_mod_bit_sizes needs at least two moduli of 20 to 60 bits, "
                f"got {list(sizes)}"
            )
        if sum(sizes) > _MAX_MODULUS_BITS[degree]:
            raise ConfigError(
                f"coeff_mod_bit_sizes total {sum(sizes)} bits exceeds "
                f"{_MAX_MODULUS_BITS[degree]}, the 128-bit security limit for "
                f"poly_modulus_degree {degree}"
            )
        if not isinstance(self.scale_bits, int) or not 20 <= self.scale_bits < sizes[0]:
            raise ConfigError(
                f"scale_bits must be from 20 to below the first modulus "
                f"({sizes[0]} bits), got {self.scale_bits!r}"
            )

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_ciphertext_bytes(self) -> int:
        """The largest serialized fresh ciphertext: two polynomials of
        ``poly_modulus_degree`` 8-byte coefficients per data modulus, plus
        headers."""
        data_moduli = len(self.coeff_mod_bit_sizes) - 1
        return 2 * self.poly_modulus_degree * data_moduli * 8 + _CIPHERTEXT_HEADER_BYTES

    @property
    def release_grid(self) -> float:
        """The step that ``round_for_release`` rounds a decrypted sum to."""
        return 2.0 ** (_RELEASE_MARGIN_BITS - self.scale_bits)


def check_ckks_capacity(
    *, parameters: CkksParameters, clip: float, max_weight: int, site_count: int
) -> None:
    """Check that a sum of encrypted weighted updates stays decryptable.

    The sum's magnitude is at most ``site_count * max_weight * clip``; scaled by
    ``2^scale_bits`` it must stay below the data modulus, with a margin for
    noise.

    Raises:
        ConfigError: a parameter is out of range or the sum can overflow.
    """
    if not isinstance(clip, int | float) or not math.isfinite(clip) or clip <= 0:
        raise ConfigError(f"clip must be a positive finite number, got {clip!r}")
    if not isinstance(max_weight, int) or max_weight < 1:
        raise ConfigError(
            f"max_weight must be a positive integer sample count, got {max_weight!r}"
        )
    if not isinstance(site_count, int) or site_count < 1:
        raise ConfigError(f"site_count must be a positive integer, got {site_count!r}")
    bound = site_count * max_weight * clip
    needed_bits = math.log2(bound) + parameters.scale_bits + _NOISE_MARGIN_BITS + 1
    if needed_bits > parameters.data_modulus_bits:
        raise ConfigError(
            f"the CKKS sum can overflow: site_count {site_count} x max_weight "
            f"{max_weight} x clip {clip} at scale 2^{parameters.scale_bits} needs "
            f"{math.ceil(needed_bits)} bits but the data modulus has "
            f"{parameters.data_modulus_bits}; lower scale_bits or add a modulus"
        )


class CkksSiteContext:
    """The secret CKKS context that every site of a study holds."""

    def __init__(self, context: Any, parameters: CkksParameters) -> None:
        if not context.is_private():
            raise SecureAggregationError(
                "a site's CKKS context must contain the secret key"
            )
        self._context = context
        self.parameters = parameters

    @classmethod
    def create(cls, parameters: CkksParameters | None = None) -> "CkksSiteContext":
        """Generate a new key pair and context for a study."""
        parameters = parameters or CkksParameters()
        ts = _tenseal()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=parameters.poly_modulus_degree,
            coeff_mod_bit_sizes=list(parameters.coeff_mod_bit_sizes),
        )
        context.global_scale = 2.0**parameters.scale_bits
        return cls(context, parameters)

    @classmethod
    def from_bytes(cls, data: bytes, parameters: CkksParameters) -> "CkksSiteContext":
        """Load a secret context that another site of the study exported.

        Raises:
            SecureAggregationError: the bytes are not a context, it has no
                secret key, or it was made for other parameters.
        """
        context = _load_context(data)
        expected = _keyless_context(parameters)
        if _parms_id(context) != _parms_id(expected):
            raise SecureAggregationError(
                "the CKKS secret context was made for other encryption parameters "
                f"than poly_modulus_degree {parameters.poly_modulus_degree} and "
                f"coeff_mod_bit_sizes {list(parameters.coeff_mod_bit_sizes)}; "
                "provision the study's keys again for its secure_aggregation section"
            )
        context.global_scale = 2.0**parameters.scale_bits
        return cls(context, parameters)

    def secret_bytes(self) -> bytes:
        """Return the context with its secret key, for the study's sites only."""
        return bytes(
            self._context.serialize(
                save_public_key=True,
                save_secret_key=True,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )

    def public_bytes(self) -> bytes:
        """Return the parameters without any key: all the service needs to add."""
        return bytes(
            self._context.serialize(
                save_public_key=False,
                save_secret_key=False,
                save_galois_keys=False,
                save_relin_keys=False,
            )
        )

    def encrypt_vector(self, vector: np.ndarray) -> list[bytes]:
        """Encrypt a float vector as ciphertexts of at most ``slot_count`` values."""
        ts = _tenseal()
        values = np.asarray(vector, dtype=np.float64)
        slots = self.parameters.slot_count
        return [
            bytes(
                ts.ckks_vector(self._context, values[start : start + slots]).serialize()
            )
            for start in range(0, values.size, slots)
        ]

    def encrypt_update(
        self,
        update: Mapping[str, np.ndarray],
        *,
        sample_count: int,
        clip: float,
    ) -> list[bytes]:
        """Clip ``update`` to ``[-clip, clip]``, weight it by ``sample_count``
        and encrypt it in ``VectorLayout`` order."""
        if not isinstance(sample_count, int) or sample_count < 1:
            raise SecureAggregationError(
                f"sample_count must be a positive integer, got {sample_count!r}"
            )
        vector = VectorLayout.of(update).flatten(update)
        if not np.isfinite(vector).all():
            raise SecureAggregationError(
                "update contains NaN or infinite values and cannot be encrypted"
            )
        return self.encrypt_vector(np.clip(vector, -clip, clip) * sample_count)

    def decrypt_vector(self, chunks: Sequence[bytes], length: int) -> np.ndarray:
        """Decrypt an aggregate into a float64 vector of ``length`` values."""
        ts = _tenseal()
        parts = []
        for chunk in chunks:
            try:
                parts.append(ts.ckks_vector_from(self._context, chunk).decrypt())
            except (ValueError, RuntimeError) as error:
                raise SecureAggregationError(
                    f"aggregate ciphertext failed to decrypt: {error}"
                ) from None
        vector = np.concatenate([np.asarray(part, np.float64) for part in parts])
        if vector.size != length:
            raise SecureAggregationError(
                f"aggregate decrypts to {vector.size} values, expected {length}"
            )
        return vector


class CkksAggregator:
    """The service's side: adds the sites' ciphertexts without any key.

    Args:
        public_context: ``CkksSiteContext.public_bytes()``, or None to build
            a keyless context from ``parameters``.
        vector_length: the number of values in every site's update.
        parameters: the study's parameters. When given, every ciphertext must
            also have the scale ``2^scale_bits`` and at most
            ``parameters.max_ciphertext_bytes`` bytes.

    Raises:
        SecureAggregationError: the context is unreadable or contains a
            secret key, which the service must never hold.
    """

    def __init__(
        self,
        public_context: bytes | None = None,
        *,
        vector_length: int,
        parameters: CkksParameters | None = None,
    ) -> None:
        if public_context is not None:
            context = _load_context(public_context)
        elif parameters is not None:
            context = _keyless_context(parameters)
        else:
            raise SecureAggregationError(
                "CkksAggregator needs a public context or the study's parameters"
            )
        if context.is_private():
            raise SecureAggregationError(
                "the aggregation service received a CKKS context with a secret "
                "key; send it the public context only"
            )
        self._context = context
        self.vector_length = vector_length
        first = context.seal_context().data.first_context_data().parms()
        self.slot_count = int(first.poly_modulus_degree()) // 2
        #: The scale every ciphertext must have, or None to accept any.
        self.scale = None if parameters is None else 2.0**parameters.scale_bits
        self.max_ciphertext_bytes = (
            _MAX_CIPHERTEXT_BYTES
            if parameters is None
            else parameters.max_ciphertext_bytes
        )
        self._sum: list[Any] | None = None
        self._sample_count = 0
        self._sites: list[str] = []

    def validate(self, site: str, chunks: Sequence[bytes]) -> None:
        """Check that ``chunks`` would add to the sum, without adding them.

        Raises:
            SecureAggregationError: as for ``add``.
        """
        self._load_chunks(site, chunks)

    def add(self, site: str, chunks: Sequence[bytes], *, sample_count: int) -> None:
        """Add a site's encrypted update to the running sum.

        Raises:
            SecureAggregationError: the site already contributed, or a chunk
                is oversized, unreadable or of the wrong length.
        """
        if not isinstance(sample_count, int) or sample_count < 1:
            raise SecureAggregationError(
                f"sample_count from {site!r} must be a positive integer, "
                f"got {sample_count!r}"
            )
        if site in self._sites:
            raise SecureAggregationError(f"site {site!r} already contributed")
        vectors = self._load_chunks(site, chunks)
        if self._sum is None:
            self._sum = vectors
        else:
            self._sum = [
                total + vector for total, vector in zip(self._sum, vectors, strict=True)
            ]
        self._sites.append(site)
        self._sample_count += sample_count

    @property
    def sample_count(self) -> int:
        return self._sample_count

    @property
    def sites(self) -> list[str]:
        return sorted(self._sites)

    def aggregate(self) -> list[bytes]:
        """Return the serialized ciphertexts of the sum.

        Raises:
            SecureAggregationError: no site contributed.
        """
        if self._sum is None:
            raise SecureAggregationError("no encrypted update was added this round")
        return [bytes(vector.serialize()) for vector in self._sum]

    def _load_chunks(self, site: str, chunks: Sequence[bytes]) -> list[Any]:
        ts = _tenseal()
        vectors = []
        remaining = self.vector_length
        first_parms_id = self._context.seal_context().data.first_parms_id()
        for position, chunk in enumerate(chunks):
            if len(chunk) > self.max_ciphertext_bytes:
                raise SecureAggregationError(
                    f"ciphertext {position} from {site!r} has {len(chunk)} bytes, "
                    f"more than the limit of {self.max_ciphertext_bytes}"
                )
            try:
                vector = ts.ckks_vector_from(self._context, bytes(chunk))
            # SEAL reports a corrupt ciphertext as RuntimeError, TenSEAL a
            # stream it cannot parse as ValueError.
            except (ValueError, RuntimeError) as error:
                raise SecureAggregationError(
                    f"ciphertext {position} from {site!r} is unreadable: {error}"
                ) from None
            self._check_ciphertext(site, position, vector, first_parms_id)
            if remaining <= 0 or vector.size() != min(remaining, self.slot_count):
                raise SecureAggregationError(
                    f"ciphertext {position} from {site!r} contains {vector.size()} "
                    f"values, which does not fit an update of {self.vector_length}"
                )
            remaining -= vector.size()
            vectors.append(vector)
        if remaining != 0:
            raise SecureAggregationError(
                f"ciphertexts from {site!r} hold {self.vector_length - remaining} "
                f"values, expected {self.vector_length}"
            )
        return vectors

    def _check_ciphertext(
        self, site: str, position: int, vector: Any, first_parms_id: Any
    ) -> None:
        # A fresh ciphertext has two polynomials, is at the first level of the
        # modulus chain and has the study's scale. Only such ciphertexts can
        # be added to each other.
        ciphertexts = vector.ciphertext()
        if len(ciphertexts) != 1:
            raise SecureAggregationError(
                f"ciphertext {position} from {site!r} contains {len(ciphertexts)} "
                "ciphertexts; expected one"
            )
        ciphertext = ciphertexts[0]
        if ciphertext.size() != 2 or ciphertext.parms_id() != first_parms_id:
            raise SecureAggregationError(
                f"ciphertext {position} from {site!r} is not a fresh encryption "
                f"under the study's parameters (size {ciphertext.size()})"
            )
        if self.scale is not None and ciphertext.scale != self.scale:
            raise SecureAggregationError(
                f"ciphertext {position} from {site!r} has scale "
                f"{ciphertext.scale!r}; the study encrypts at scale {self.scale!r}"
            )


def round_for_release(vector: np.ndarray, parameters: CkksParameters) -> np.ndarray:
    """Round a decrypted sum to ``parameters.release_grid`` before it leaves a site.

    The rounding hides the low bits that carry the decryption noise, from
    which the service could otherwise solve for the secret key. It adds at
    most half a grid step (about 5e-4 at scale 2^30) to each value.

    NOTE: this is a heuristic defence. It is not the noise flooding that
    makes CKKS decryption provably safe to share, which would need a larger
    modulus and costs precision.
    """
    grid = parameters.release_grid
    return np.round(np.asarray(vector, np.float64) / grid) * grid


def _keyless_context(parameters: CkksParameters) -> Any:
    """Build a context for ``parameters`` and drop its secret key at once."""
    ts = _tenseal()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=parameters.poly_modulus_degree,
        coeff_mod_bit_sizes=list(parameters.coeff_mod_bit_sizes),
    )
    context.make_context_public()
    return context


def _parms_id(context: Any) -> list[int]:
    return list(context.seal_context().data.key_parms_id())


def _load_context(data: bytes) -> Any:
    ts = _tenseal()
    try:
        return ts.context_from(data)
    except ValueError as error:
        raise SecureAggregationError(f"CKKS context is unreadable: {error}") from None
