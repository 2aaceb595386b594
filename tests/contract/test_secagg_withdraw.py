"""A site that shared keys withdraws from a masking round before uploading."""

import json

import numpy as np
import pytest

from medfed.contract.secagg import FixedPointEncoding, MaskingServer, MaskingSite
from medfed.errors import SecureAggregationError

NAMES = ["site-a", "site-b", "site-c", "site-d"]
ENCODING = FixedPointEncoding(fractional_bits=8, clip=4.0, max_weight=10, site_count=4)


class Round:
    """A masking round in which the sites in ``sharing`` uploaded shares."""

    def __init__(self, threshold: int = 3, sharing: list[str] = NAMES) -> None:
        self.sites = {
            name: MaskingSite(
                site=name, study="heart", round_number=2, encoding=ENCODING
            )
            for name in NAMES
        }
        self.server = MaskingServer(
            study="heart",
            round_number=2,
            threshold=threshold,
            encoding=ENCODING,
            vector_length=2,
        )
        for site in self.sites.values():
            self.server.add_advertisement(site.advertise())
        self.roster = self.server.close_advertising()
        for name in sharing:
            self.server.add_share_upload(self.sites[name].share_keys(self.roster))
        self.masked: dict[str, np.ndarray] = {}

    def upload(self, name: str, value: float) -> None:
        site = self.sites[name]
        site.receive_shares(self.server.shares_for(name))
        update = {"w": np.array([value, -value])}
        vector = site.mask_update(update, sample_count=2)["w"]
        self.server.add_masked_update(name, vector, sample_count=2)
        self.masked[name] = vector


def test_withdrawn_site_dropped_without_deadline():
    round_ = Round()
    round_.server.close_sharing()
    round_.server.withdraw("site-d")
    for index, name in enumerate(NAMES[:3]):
        round_.upload(name, float(index + 1))

    assert round_.server.uploads_complete
    request = round_.server.close_uploads()
    assert request.dropped == ["site-d"]
    for name in NAMES[:3]:
        round_.server.add_reveal(round_.sites[name].reveal(request))
    result = round_.server.unmask()
    np.testing.assert_array_equal(result.weighted_sum, [12.0, -12.0])


def test_uploads_wait_for_sites_not_withdrawn():
    round_ = Round()
    round_.server.close_sharing()
    round_.server.withdraw("site-d")
    round_.upload("site-a", 1.0)
    round_.upload("site-b", 2.0)

    assert not round_.server.uploads_complete


def test_uploads_incomplete_below_threshold():
    round_ = Round(threshold=3)
    round_.server.close_sharing()
    round_.server.withdraw("site-c")
    round_.server.withdraw("site-d")
    round_.upload("site-a", 1.0)
    round_.upload("site-b", 2.0)

    # Closing would raise, so uploads stay open and the service aborts the
    # round because the threshold is out of reach.
    assert not round_.server.uploads_complete
    assert not round_.server.threshold_reachable


def test_withdrawal_during_sharing_kept():
    round_ = Round()
    round_.server.withdraw("site-d")
    round_.server.close_sharing()

    assert round_.server.withdrawn_sites == ["site-d"]


def test_withdrawn_site_upload_rejected():
    round_ = Round()
    round_.server.close_sharing()
    round_.server.withdraw("site-d")

    with pytest.raises(SecureAggregationError, match="withdrew from this round"):
        round_.upload("site-d", 4.0)
    assert round_.server.uploaded_sites == []


def test_withdrawal_after_upload_rejected():
    round_ = Round()
    round_.server.close_sharing()
    round_.upload("site-a", 1.0)

    with pytest.raises(SecureAggregationError, match="already uploaded"):
        round_.server.withdraw("site-a")
    assert round_.server.withdrawn_sites == []


def test_withdrawal_before_advertising_bars_later_advertisement():
    server = MaskingServer(
        study="heart", round_number=2, threshold=3, encoding=ENCODING, vector_length=2
    )
    site = MaskingSite(site="site-a", study="heart", round_number=2, encoding=ENCODING)

    server.withdraw("site-a")

    assert server.withdrawn_sites == ["site-a"]
    with pytest.raises(SecureAggregationError, match="withdrew from this round"):
        server.add_advertisement(site.advertise())


def test_withdrawal_while_advertising_leaves_roster():
    server = MaskingServer(
        study="heart", round_number=2, threshold=3, encoding=ENCODING, vector_length=2
    )
    sites = {
        name: MaskingSite(site=name, study="heart", round_number=2, encoding=ENCODING)
        for name in NAMES
    }
    advertisements = {name: site.advertise() for name, site in sites.items()}
    for advertisement in advertisements.values():
        server.add_advertisement(advertisement)
    server.withdraw("site-d")

    with pytest.raises(SecureAggregationError, match="withdrew from this round"):
        server.add_advertisement(advertisements["site-d"])
    roster = server.close_advertising()
    assert roster.sites == ["site-a", "site-b", "site-c"]
    assert server.withdrawn_sites == ["site-d"]


def test_withdrawal_without_shares_closes_sharing():
    round_ = Round(sharing=NAMES[:3])
    assert not round_.server.sharing_complete

    # site-d withdraws before sharing, so the others need not wait for it.
    round_.server.withdraw("site-d")
    with pytest.raises(SecureAggregationError, match="withdrew from this round"):
        round_.server.add_share_upload(round_.sites["site-d"].share_keys(round_.roster))
    assert round_.server.sharing_complete
    round_.server.close_sharing()
    for index, name in enumerate(NAMES[:3]):
        round_.upload(name, float(index + 1))
    request = round_.server.close_uploads()
    for name in NAMES[:3]:
        round_.server.add_reveal(round_.sites[name].reveal(request))
    result = round_.server.unmask()

    assert request.dropped == []
    np.testing.assert_array_equal(result.weighted_sum, [12.0, -12.0])


def test_withdrawal_survives_restore_mid_sharing():
    round_ = Round(sharing=NAMES[:2])
    round_.server.withdraw("site-c")
    state = json.loads(json.dumps(round_.server.export_state()))

    restored = MaskingServer.restore(state, encoding=ENCODING, masked_vectors={})

    assert restored.withdrawn_sites == ["site-c"]
    assert restored.sharing_sites == ["site-a", "site-b"]


def test_withdrawal_twice_changes_nothing():
    round_ = Round()
    round_.server.close_sharing()
    round_.server.withdraw("site-d")
    round_.server.withdraw("site-d")

    assert round_.server.withdrawn_sites == ["site-d"]


def test_withdrawal_survives_restore():
    round_ = Round()
    round_.server.close_sharing()
    round_.server.withdraw("site-d")
    round_.upload("site-a", 1.0)
    state = json.loads(json.dumps(round_.server.export_state()))

    restored = MaskingServer.restore(
        state, encoding=ENCODING, masked_vectors=round_.masked
    )

    assert restored.withdrawn_sites == ["site-d"]
    assert restored.uploaded_sites == ["site-a"]


def test_threshold_unreachable_after_withdrawals():
    round_ = Round(threshold=3)
    round_.server.close_sharing()
    round_.server.withdraw("site-c")

    assert round_.server.threshold_reachable
    round_.server.withdraw("site-d")
    assert round_.server.upload_candidates == ["site-a", "site-b"]
    assert not round_.server.threshold_reachable


def test_threshold_unreachable_during_sharing():
    server = MaskingServer(
        study="heart", round_number=2, threshold=3, encoding=ENCODING, vector_length=2
    )
    sites = [
        MaskingSite(site=name, study="heart", round_number=2, encoding=ENCODING)
        for name in NAMES
    ]
    for site in sites:
        server.add_advertisement(site.advertise())
    roster = server.close_advertising()
    server.add_share_upload(sites[0].share_keys(roster))
    server.add_share_upload(sites[1].share_keys(roster))
    server.withdraw("site-a")

    # site-c and site-d have not shared yet but still may.
    assert server.upload_candidates == ["site-b", "site-c", "site-d"]
    assert server.threshold_reachable
    server.withdraw("site-b")
    assert not server.threshold_reachable


def test_withdrawal_while_advertising_survives_restore():
    sites = {
        name: MaskingSite(site=name, study="heart", round_number=2, encoding=ENCODING)
        for name in NAMES
    }
    server = MaskingServer(
        study="heart", round_number=2, threshold=3, encoding=ENCODING, vector_length=2
    )
    for site in sites.values():
        server.add_advertisement(site.advertise())
    server.withdraw("site-d")
    roster = server.close_advertising()
    for name in NAMES[:3]:
        server.add_share_upload(sites[name].share_keys(roster))
    server.close_sharing()
    state = json.loads(json.dumps(server.export_state()))

    restored = MaskingServer.restore(state, encoding=ENCODING, masked_vectors={})

    assert restored.withdrawn_sites == ["site-d"]
    assert restored.roster.sites == ["site-a", "site-b", "site-c"]
    assert restored.phase_name == "uploading"
