"""Shamir t-of-n secret sharing of 32-byte secrets over a prime field.

The field is GF(p) with ``p = 2^256 + 297``, the smallest prime above 2^256,
so every 32-byte secret (a mask seed or a raw X25519 private key) is one field
element and needs no splitting. A share is ``(index, f(index))`` for a random
polynomial ``f`` of degree ``threshold - 1`` with ``f(0)`` the secret; any
``threshold`` shares rebuild it by Lagrange interpolation at 0, and fewer
reveal nothing about it.
"""

import itertools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from medfed.errors import SecureAggregationError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "Share",
    "combine_shares",
    "rebuild_verified",
    "split_secret",
]

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
    secret = _interpolate(list(distinct.values())[:threshold], 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecureAggregationError(
            "rebuilt secret does not fit in 32 bytes: at least one share is wrong"
        )
    return secret.to_bytes(SECRET_BYTES, "big")


def rebuild_verified(
    shares: Sequence[Share],
    *,
    threshold: int,
    verify: Callable[[bytes], bool],
    max_attempts: int = 1000,
) -> tuple[bytes, list[int]]:
    """Rebuild a secret that ``verify`` accepts, tolerating some wrong shares.

    Tries subsets of ``threshold`` shares in order, starting with the first
    ``threshold``, until the rebuilt secret passes ``verify`` (a commitment or
    public-key check).

    Returns:
        The secret and the indexes of the shares that do not lie on its
        polynomial, which are wrong.

    Raises:
        SecureAggregationError: fewer than ``threshold`` distinct shares, or
            no subset among the first ``max_attempts`` passes ``verify``.
    """
    by_index: dict[int, Share] = {}
    for share in shares:
        by_index.setdefault(share.index, share)
    distinct = list(by_index.values())
    if len(distinct) < threshold:
        raise SecureAggregationError(
            f"need {threshold} distinct shares to rebuild a secret, got {len(distinct)}"
        )
    subsets = itertools.combinations(distinct, threshold)
    for subset in itertools.islice(subsets, max_attempts):
        value = _interpolate(list(subset), 0)
        if value >= 2 ** (8 * SECRET_BYTES):
            continue
        secret = value.to_bytes(SECRET_BYTES, "big")
        if verify(secret):
            wrong = [
                share.index
                for share in distinct
                if _interpolate(list(subset), share.index) != share.value
            ]
            return secret, wrong
    raise SecureAggregationError(
        f"no set of {threshold} of the {len(distinct)} shares rebuilds a secret that "
        f"passes its check in {max_attempts} attempts: too many shares are wrong"
    )


def _interpolate(points: Sequence[Share], x: int) -> int:
    """Return the value at ``x`` of the polynomial through ``points`` (Lagrange)."""
    result = 0
    for i, share_i in enumerate(points):
        numerator = 1
        denominator = 1
        for j, share_j in enumerate(points):
            if i != j:
                numerator = numerator * (x - share_j.index) % PRIME
                denominator = denominator * (share_i.index - share_j.index) % PRIME
        basis = numerator * pow(denominator, -1, PRIME) % PRIME
        result = (result + share_i.value * basis) % PRIME
    return result


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):
        result = (result * x + coefficient) % PRIME
    return result
