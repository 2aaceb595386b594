"""A site refuses a roster whose threshold is below the study's threshold."""

import pytest

from medfed.contract.secagg import (
    FixedPointEncoding,
    KeyAdvertisement,
    KeyRoster,
    MaskingSite,
)
from medfed.errors import SecureAggregationError

NAMES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
ENCODING = FixedPointEncoding(fractional_bits=8, clip=4.0, max_weight=10, site_count=5)


def advertised_sites() -> tuple[MaskingSite, list[KeyAdvertisement]]:
    """Return site-a, built with the study threshold 4, and every advertisement."""
    sites = [
        MaskingSite(
            site=name,
            study="heart",
            round_number=1,
            encoding=ENCODING,
            minimum_threshold=4,
        )
        for name in NAMES
    ]
    return sites[0], [site.advertise() for site in sites]


def roster(threshold: int, advertisements: list[KeyAdvertisement]) -> KeyRoster:
    return KeyRoster(
        study="heart", round=1, threshold=threshold, advertisements=advertisements
    )


def test_lowered_threshold_rejected_without_state_change():
    site, advertisements = advertised_sites()

    with pytest.raises(SecureAggregationError) as raised:
        site.share_keys(roster(3, advertisements))
    upload = site.share_keys(roster(4, advertisements))

    assert str(raised.value) == (
        "site 'site-a' rejected the roster of round 1 and shares no keys: it sets "
        "threshold 3, below the study's threshold 4; the aggregation service may "
        "have lowered it"
    )
    assert len(upload.shares) == len(NAMES) - 1


def test_higher_threshold_accepted():
    site, advertisements = advertised_sites()

    upload = site.share_keys(roster(5, advertisements))

    assert len(upload.shares) == len(NAMES) - 1
