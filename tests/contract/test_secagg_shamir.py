"""Shamir sharing of 32-byte secrets over GF(2^256 + 297)."""

import itertools
import secrets

import pytest
from Crypto.Util.number import isPrime
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.contract.secagg.shamir import (
    PRIME,
    Share,
    combine_shares,
    rebuild_verified,
    split_secret,
)
from medfed.errors import SecureAggregationError


def test_field_prime_is_smallest_above_2_256():
    assert isPrime(PRIME)
    assert PRIME > 2**256
    assert not any(isPrime(2**256 + offset) for offset in range(1, 297, 2))


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    share_count=st.integers(3, 20),
    data=st.data(),
)
def test_any_threshold_subset_rebuilds(secret, share_count, data):
    threshold = data.draw(st.integers(share_count // 2 + 1, share_count))
    shares = split_secret(secret, threshold=threshold, share_count=share_count)
    subset = data.draw(
        st.lists(
            st.sampled_from(shares),
            min_size=threshold,
            max_size=share_count,
            unique=True,
        )
    )

    assert combine_shares(subset, threshold=threshold) == secret


def test_all_subsets_of_small_sharing():
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, threshold=3, share_count=5)

    for subset in itertools.combinations(shares, 3):
        assert combine_shares(list(subset), threshold=3) == secret


def test_fewer_than_threshold_shares_rejected():
    shares = split_secret(secrets.token_bytes(32), threshold=3, share_count=5)

    with pytest.raises(SecureAggregationError) as error:
        combine_shares(shares[:2], threshold=3)

    assert str(error.value) == "need 3 distinct shares to rebuild a secret, got 2"


def test_duplicate_index_counted_once():
    shares = split_secret(secrets.token_bytes(32), threshold=3, share_count=5)

    with pytest.raises(SecureAggregationError, match="need 3 distinct shares"):
        combine_shares([shares[0], shares[0], shares[1]], threshold=3)


def test_below_threshold_shares_fit_any_secret():
    # Two shares of a 3-of-5 sharing are consistent with every candidate
    # secret: for each one some degree-2 polynomial passes through them.
    shares = split_secret(b"\x01" * 32, threshold=3, share_count=5)
    known = shares[:2]

    for candidate in (b"\x00" * 32, b"\x01" * 32, secrets.token_bytes(32)):
        # The polynomial through (0, candidate) and the two known points
        # gives a third share; with it, combine returns the candidate.
        points = [Share(0, int.from_bytes(candidate, "big")), *known]
        x = 5
        value = 0
        for i, point_i in enumerate(points):
            basis = 1
            for j, point_j in enumerate(points):
                if i != j:
                    basis = (
                        basis
                        * (x - point_j.index)
                        * pow(point_i.index - point_j.index, -1, PRIME)
                        % PRIME
                    )
            value = (value + point_i.value * basis) % PRIME
        forged = Share(x, value)

        assert combine_shares([*known, forged], threshold=3) == candidate


def test_share_hex_round_trip():
    share = split_secret(secrets.token_bytes(32), threshold=2, share_count=3)[2]

    assert Share.from_hex(share.index, share.value_hex()) == share


@pytest.mark.parametrize(
    ("secret", "threshold", "message"),
    [
        (b"short", 2, "a shared secret must be 32 bytes, got 5"),
        (b"\x00" * 32, 0, "threshold must be from 1 to share_count 3, got 0"),
        (b"\x00" * 32, 4, "threshold must be from 1 to share_count 3, got 4"),
    ],
)
def test_split_rejects_invalid_input(secret, threshold, message):
    with pytest.raises(SecureAggregationError) as error:
        split_secret(secret, threshold=threshold, share_count=3)

    assert str(error.value) == message


def test_rebuild_verified_skips_wrong_share():
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, threshold=3, share_count=5)
    shares[1] = Share(shares[1].index, (shares[1].value + 1) % PRIME)

    rebuilt, wrong = rebuild_verified(
        shares, threshold=3, verify=lambda candidate: candidate == secret
    )

    assert rebuilt == secret
    assert wrong == [2]


def test_rebuild_verified_gives_up():
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, threshold=3, share_count=4)
    # Two of four shares altered by different amounts: every 3-subset contains a
    # wrong share, and no two alterations cancel at x = 0.
    shares[0] = Share(shares[0].index, (shares[0].value + 1) % PRIME)
    shares[1] = Share(shares[1].index, (shares[1].value + 5) % PRIME)

    with pytest.raises(SecureAggregationError) as error:
        rebuild_verified(
            shares, threshold=3, verify=lambda candidate: candidate == secret
        )

    assert str(error.value) == (
        "no set of 3 of the 4 shares rebuilds a secret that passes its check in "
        "1000 attempts: too many shares are wrong"
    )
