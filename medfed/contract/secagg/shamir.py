"""Shamir t-of-n secret sharing of 32-byte secrets over a prime field.

The field is GF(p) with ``p = 2^256 + 297``, the smallest prime above 2^256,
so every 32-byte secret (a mask seed or a raw X25519 private key) is one field
element and needs no splitting. A share is ``(index, f(index))`` for a random
polynomial ``f`` of degree ``threshold - 1`` with ``f(0)`` the secret; any
``threshold`` shares rebuild it by Lagrange interpolation at 0, and fewer
reveal nothing about it.
"""

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from medfed.errors import SecureAggregationError

__all__ = ["PRIME", "SECRET_BYTES", "Share", "combine_shares", "split_secret"]

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_VALUE_BYTES = 33


@dataclass(frozen=True)
class Share:
    """One point of a sharing polynomial: ``index`` >= 1, ``value`` in GF(p)."""

    index: int
    value: int

    def value_hex(self) -> str:
        return self.value.to_bytes(SHARE_VALUE_BYTES, "big").hex()

    @classmethod
    def from_hex(cls, index: int, value_hex: str) -> "Share":
        value = int.from_bytes(bytes.fromhex(value_hex), "big")
        if not 1 <= index < PRIME or value >= PRIME:
            raise SecureAggregationError(
                f"share index {index} or value is outside the field"
            )
        return cls(index=index, value=value)


def split_secret(secret: bytes, *, threshold: int, share_count: int) -> list[Share]:
    """Split ``secret`` into ``share_count`` shares, any ``threshold`` of which
    rebuild it.

    Returns:
        Shares with indexes 1 to ``share_count``, in that order.

    Raises:
        SecureAggregationError: the secret is not 32 bytes, or the threshold is
            not from 1 to ``share_count``.
    """
    if len(secret) != SECRET_BYTES:
        raise SecureAggregationError(
            f"a shared secret must be {SECRET_BYTES} bytes, got {len(secret)}"
        )
    if not isinstance(threshold, int) or not 1 <= threshold <= share_count:
        raise SecureAggregationError(
            f"threshold must be from 1 to share_count {share_count}, got {threshold!r}"
        )
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    return [
        Share(index=index, value=_evaluate(coefficients, index))
        for index in range(1, share_count + 1)
    ]


def combine_shares(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares.

    Uses the first ``threshold`` shares with distinct indexes. A wrong share
    yields a wrong secret, not an error, so callers check the result against
    a commitment or a public key.

    Raises:
        SecureAggregationError: fewer than ``threshold`` distinct shares.
    """
    distinct: dict[int, Share] = {}
    for share in shares:
        distinct.setdefault(share.index, share)
    if len(distinct) < threshold:
        raise SecureAggregationError(
            f"need {threshold} distinct shares to rebuild a secret, got {len(distinct)}"
        )
    points = list(distinct.values())[:threshold]
    secret = 0
    for i, share_i in enumerate(points):
        numerator = 1
        denominator = 1
        for j, share_j in enumerate(points):
            if i != j:
                numerator = numerator * share_j.index % PRIME
                denominator = denominator * (share_j.index - share_i.index) % PRIME
        basis = numerator * pow(denominator, -1, PRIME) % PRIME
        secret = (secret + share_i.value * basis) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecureAggregationError(
            "rebuilt secret does not fit in 32 bytes: at least one share is wrong"
        )
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result
