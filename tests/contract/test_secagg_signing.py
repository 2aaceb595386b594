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
from medfed.contract.secagg.signing import verify_advertisement
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


def test_site_rejects_substituted_keys(signing_keys, verify_keys):
    sites = make_sites(signing_keys, verify_keys)
    advertisements = [site.advertise() for site in sites.values()]
    # The service replaces site-b's public keys with those of a site it runs.
    impostor = MaskingSite(
        site="site-b", study="heart", round_number=1, encoding=ENCODING
    ).advertise()
    forged = advertisements[1].model_copy(
        update={
            "mask_public_key": impostor.mask_public_key,
            "share_public_key": impostor.share_public_key,
        }
    )
    roster = KeyRoster(
        study="heart",
        round=1,
        threshold=3,
        advertisements=[advertisements[0], forged, *advertisements[2:]],
    )

    with pytest.raises(SecureAggregationError) as error:
        sites["site-a"].share_keys(roster)

    assert str(error.value) == (
        "key advertisement of site 'site-b' has an invalid signature: it was "
        "altered or not signed with the site's key"
    )


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
