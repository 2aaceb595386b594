"""Persisting a masking round's service state and restoring it."""

import json

import numpy as np
import pytest

from medfed.contract.secagg import FixedPointEncoding, MaskingServer, MaskingSite
from medfed.errors import SecureAggregationError

NAMES = ["site-a", "site-b", "site-c", "site-d", "site-e"]
ENCODING = FixedPointEncoding(fractional_bits=8, clip=4.0, max_weight=10, site_count=5)
UPDATES = {
    name: np.array([index, -index], np.float64) for index, name in enumerate(NAMES)
}


def through_json(server, masked):
    """Export, serialize, parse and restore ``server`` as a service restart would."""
    state = json.loads(json.dumps(server.export_state()))
    return MaskingServer.restore(state, encoding=ENCODING, masked_vectors=masked)


def test_restore_between_every_phase():
    sites = {
        name: MaskingSite(site=name, study="heart", round_number=4, encoding=ENCODING)
        for name in NAMES
    }
    server = MaskingServer(
        study="heart", round_number=4, threshold=3, encoding=ENCODING, vector_length=2
    )
    masked = {}
    for site in sites.values():
        server.add_advertisement(site.advertise())
    server = through_json(server, masked)
    roster = server.close_advertising()
    server = through_json(server, masked)
    for site in sites.values():
        server.add_share_upload(site.share_keys(roster))
    server = through_json(server, masked)
    server.close_sharing()
    server = through_json(server, masked)
    for name in NAMES[:4]:
        sites[name].receive_shares(server.shares_for(name))
        vector = sites[name].mask_update({"w": UPDATES[name]}, sample_count=2)["w"]
        server.add_masked_update(name, vector, sample_count=2)
        masked[name] = vector
    server = through_json(server, masked)
    request = server.close_uploads()
    server = through_json(server, masked)
    for name in NAMES[:3]:
        server.add_reveal(sites[name].reveal(request))
    server = through_json(server, masked)

    result = server.unmask()

    np.testing.assert_array_equal(result.weighted_sum, [12.0, -12.0])
    assert result.survivors == ("site-a", "site-b", "site-c", "site-d")


def test_restore_rejects_missing_vectors():
    server = MaskingServer(
        study="heart", round_number=4, threshold=3, encoding=ENCODING, vector_length=2
    )
    state = server.export_state()
    state["sample_counts"] = {"site-a": 2}

    with pytest.raises(SecureAggregationError) as error:
        MaskingServer.restore(state, encoding=ENCODING, masked_vectors={})

    assert str(error.value) == (
        "masked vectors are given for sites [] but the state records uploads from "
        "['site-a']"
    )


def test_restore_rejects_malformed_state():
    server = MaskingServer(
        study="heart", round_number=4, threshold=3, encoding=ENCODING, vector_length=2
    )
    state = server.export_state()
    del state["reveals"]

    with pytest.raises(SecureAggregationError) as error:
        MaskingServer.restore(state, encoding=ENCODING, masked_vectors={})

    assert str(error.value) == "masking round state is malformed: KeyError('reveals')"


def test_restore_rejects_finished_round():
    server = MaskingServer(
        study="heart", round_number=4, threshold=3, encoding=ENCODING, vector_length=2
    )
    state = server.export_state() | {"phase": "done"}

    with pytest.raises(SecureAggregationError, match="already unmasked"):
        MaskingServer.restore(state, encoding=ENCODING, masked_vectors={})
