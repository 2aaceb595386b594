"""Signed key advertisements: a service cannot substitute a site's keys."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.contract.secagg import (
    FixedPointEncoding,
    KeyRoster,
    MaskingServer,
    MaskingSite,
)
from medfed.contract.secagg.keys import RoundContext
from medfed.contract.secagg.signing import sign_advertisement, verify_advertisement
from medfed.errors import SecureAggregationError

NAMES = ["site-a", "site-b", "site-c", "site-d"]
ENCODING = FixedPointEncoding(fractional_bits=8, clip=4.0, max_weight=10, site_count=4)


@pytest.fixture(scope="module")
def signing_keys():
    return {name: Ed25519PrivateKey.generate() for name in NAMES}


@pytest.fixture(scope="module")
def verify_keys(signing_keys):
    return {name: key.public_key() for name, key in signing_keys.items()}


def make_sites(signing_keys, verify_keys, round_number=1):
    return {
        name: MaskingSite(
            site=name,
            study="heart",
            round_number=round_number,
            encoding=ENCODING,
            signing_key=signing_keys[name],
            peer_verify_keys=verify_keys,
        )
        for name in NAMES
    }


def make_server(verify_keys, round_number=1):
    return MaskingServer(
        study="heart",
        round_number=round_number,
        threshold=3,
        encoding=ENCODING,
        vector_length=2,
        verify_keys=verify_keys,
    )


def test_signed_round_sums(signing_keys, verify_keys):
    sites = make_sites(signing_keys, verify_keys)
    server = make_server(verify_keys)
    for site in sites.values():
        server.add_advertisement(site.advertise())
    roster = server.close_advertising()
    for site in sites.values():
        server.add_share_upload(site.share_keys(roster))
    server.close_sharing()
    for name, site in sites.items():
        site.receive_shares(server.shares_for(name))
        masked = site.mask_update({"w": np.array([1.0, -2.0])}, sample_count=3)
        server.add_masked_update(name, masked["w"], sample_count=3)
    request = server.close_uploads()
    for site in sites.values():
        server.add_reveal(site.reveal(request))

    result = server.unmask()

    np.testing.assert_array_equal(result.weighted_sum, [12.0, -24.0])


def impostor_keys(round_number=1, signing_key=None):
    """Keys of a site that the service runs itself, advertised as site-b."""
    return MaskingSite(
        site="site-b",
        study="heart",
        round_number=round_number,
        encoding=ENCODING,
        signing_key=signing_key,
    ).advertise()


def swapped_and_resigned(advertisement, signing_keys):
    impostor = impostor_keys(signing_key=Ed25519PrivateKey.generate())
    return advertisement.model_copy(
        update={
            "mask_public_key": impostor.mask_public_key,
            "share_public_key": impostor.share_public_key,
            "signature": impostor.signature,
        }
    )


def swapped_and_unsigned(advertisement, signing_keys):
    impostor = impostor_keys()
    return advertisement.model_copy(
        update={
            "mask_public_key": impostor.mask_public_key,
            "share_public_key": impostor.share_public_key,
            "signature": None,
        }
    )


def swapped_keeping_signature(advertisement, signing_keys):
    impostor = impostor_keys()
    return advertisement.model_copy(
        update={
            "mask_public_key": impostor.mask_public_key,
            "share_public_key": impostor.share_public_key,
        }
    )


def replayed_from_other_round(advertisement, signing_keys):
    # site-b's own signature over its keys, but for round 2.
    return sign_advertisement(
        advertisement.model_copy(update={"signature": None}),
        signing_keys["site-b"],
        RoundContext("heart", 2),
    )


INVALID = "has an invalid signature: it was altered or not signed with the site's key"
FORGERIES = {
    "re-signed by another key": (swapped_and_resigned, INVALID),
    "unsigned": (swapped_and_unsigned, "is not signed"),
    "signature kept": (swapped_keeping_signature, INVALID),
    "signed for another round": (replayed_from_other_round, INVALID),
}


def roster_with(advertisements, replacement_of_b):
    return KeyRoster(
        study="heart",
        round=1,
        threshold=3,
        advertisements=[advertisements[0], replacement_of_b, *advertisements[2:]],
    )


@pytest.mark.parametrize("forgery", FORGERIES, ids=list(FORGERIES))
def test_site_rejects_substituted_keys(signing_keys, verify_keys, forgery):
    forge, reason = FORGERIES[forgery]
    sites = make_sites(signing_keys, verify_keys)
    advertisements = [site.advertise() for site in sites.values()]
    roster = roster_with(advertisements, forge(advertisements[1], signing_keys))

    with pytest.raises(SecureAggregationError) as error:
        sites["site-a"].share_keys(roster)

    assert str(error.value) == (
        "site 'site-a' rejected the roster of round 1 and shares no keys: key "
        f"advertisement of site 'site-b' {reason}; the aggregation service may be "
        "tampering with the sites' public keys (a man in the middle)"
    )


def test_rejected_roster_changes_no_state(signing_keys, verify_keys):
    sites = make_sites(signing_keys, verify_keys)
    advertisements = [site.advertise() for site in sites.values()]
    forged = roster_with(
        advertisements, swapped_and_resigned(advertisements[1], signing_keys)
    )
    honest = roster_with(advertisements, advertisements[1])

    with pytest.raises(SecureAggregationError, match="'site-b' has an invalid"):
        sites["site-a"].share_keys(forged)
    upload = sites["site-a"].share_keys(honest)

    assert sorted(share.recipient for share in upload.shares) == NAMES[1:]


def test_site_rejects_site_missing_from_registry(signing_keys, verify_keys):
    registry = {name: key for name, key in verify_keys.items() if name != "site-d"}
    site = MaskingSite(
        site="site-a",
        study="heart",
        round_number=1,
        encoding=ENCODING,
        signing_key=signing_keys["site-a"],
        peer_verify_keys=registry,
    )
    others = make_sites(signing_keys, verify_keys)
    advertisements = [site.advertise()] + [
        others[name].advertise() for name in NAMES[1:]
    ]
    roster = KeyRoster(
        study="heart", round=1, threshold=3, advertisements=advertisements
    )

    with pytest.raises(SecureAggregationError) as error:
        site.share_keys(roster)

    assert "roster lists site 'site-d', which has no verify key" in str(error.value)
    assert "may be tampering with the sites' public keys" in str(error.value)


def test_site_rejects_own_keys_swapped(signing_keys, verify_keys):
    sites = make_sites(signing_keys, verify_keys)
    advertisements = [site.advertise() for site in sites.values()]
    roster = roster_with(
        advertisements, swapped_and_resigned(advertisements[1], signing_keys)
    )

    with pytest.raises(SecureAggregationError) as error:
        sites["site-b"].share_keys(roster)

    assert str(error.value) == (
        "roster carries keys for site 'site-b' that are not its own; the "
        "aggregation service may be tampering with the sites' public keys "
        "(a man in the middle)"
    )


def test_unsigned_sites_accept_unsigned_roster():
    # Local mode has no kit, so advertisements are unsigned and unchecked.
    sites = {
        name: MaskingSite(site=name, study="heart", round_number=1, encoding=ENCODING)
        for name in NAMES
    }
    advertisements = [site.advertise() for site in sites.values()]
    roster = KeyRoster(
        study="heart", round=1, threshold=3, advertisements=advertisements
    )

    upload = sites["site-a"].share_keys(roster)

    assert all(item.signature is None for item in advertisements)
    assert len(upload.shares) == 3


def test_server_rejects_unsigned_advertisement(verify_keys):
    server = make_server(verify_keys)
    unsigned = MaskingSite(
        site="site-a", study="heart", round_number=1, encoding=ENCODING
    ).advertise()

    with pytest.raises(SecureAggregationError) as error:
        server.add_advertisement(unsigned)

    assert str(error.value) == "key advertisement of site 'site-a' is not signed"


def test_server_rejects_unknown_site(verify_keys):
    server = make_server(verify_keys)
    stranger = MaskingSite(
        site="site-z",
        study="heart",
        round_number=1,
        encoding=ENCODING,
        signing_key=Ed25519PrivateKey.generate(),
    ).advertise()

    with pytest.raises(SecureAggregationError) as error:
        server.add_advertisement(stranger)

    assert str(error.value) == "site 'site-z' has no known verify key in this study"


def test_signature_bound_to_round(signing_keys, verify_keys):
    advertisement = make_sites(signing_keys, verify_keys, round_number=1)[
        "site-a"
    ].advertise()

    verify_advertisement(advertisement, verify_keys["site-a"], RoundContext("heart", 1))
    with pytest.raises(SecureAggregationError, match="has an invalid signature"):
        verify_advertisement(
            advertisement, verify_keys["site-a"], RoundContext("heart", 2)
        )
