"""Masked ring vectors through the update envelope with the masked codec."""

import numpy as np
import pytest

from medfed.contract.codecs import get_codec
from medfed.contract.secagg import FixedPointEncoding, MaskingServer, MaskingSite
from medfed.contract.wire import decode_envelope, encode_envelope
from medfed.errors import ConfigError, EnvelopeError


def masked_round_through_envelopes(updates, counts):
    """Run a 3-site round in which every masked update travels as an envelope."""
    encoding = FixedPointEncoding(
        fractional_bits=16, clip=1.0, max_weight=100, site_count=3
    )
    sites = {
        name: MaskingSite(site=name, study="heart", round_number=1, encoding=encoding)
        for name in updates
    }
    server = MaskingServer(
        study="heart", round_number=1, threshold=2, encoding=encoding, vector_length=7
    )

    for site in sites.values():
        server.add_advertisement(site.advertise())
    roster = server.close_advertising()
    for site in sites.values():
        server.add_share_upload(site.share_keys(roster))
    server.close_sharing()

    envelopes = {}
    for name, site in sites.items():
        site.receive_shares(server.shares_for(name))
        masked = site.mask_update(updates[name], sample_count=counts[name])
        envelopes[name] = encode_envelope(
            masked,
            study="heart",
            round_number=1,
            site=name,
            sample_count=counts[name],
            nonce="0123456789abcdef",
            codec_name="masked",
            codec_params={"ring_bits": 32, "fractional_bits": 16},
        )

    for name, envelope in envelopes.items():
        decoded = decode_envelope(envelope)
        layout_vector = np.concatenate(
            [decoded.tensors[key].ravel() for key in sorted(decoded.tensors)]
        )
        server.add_masked_update(
            name, layout_vector, sample_count=decoded.header.sample_count
        )

    request = server.close_uploads()
    for site in sites.values():
        server.add_reveal(site.reveal(request))
    return server.unmask(), envelopes


def test_masked_envelope_round_trip():
    updates = {
        f"site-{index}": {
            "bias": np.full(3, 0.25 * index, np.float32),
            "weight": np.full((2, 2), -0.5, np.float32),
        }
        for index in range(3)
    }
    counts = {"site-0": 10, "site-1": 20, "site-2": 30}

    result, envelopes = masked_round_through_envelopes(updates, counts)

    expected_bias = 0.25 * (0 * 10 + 1 * 20 + 2 * 30)
    np.testing.assert_array_equal(result.weighted_sum[:3], np.full(3, expected_bias))
    np.testing.assert_array_equal(result.weighted_sum[3:], np.full(4, -0.5 * 60))
    header = decode_envelope(envelopes["site-0"]).header
    assert header.codec.name == "masked"
    assert header.codec.params == {"ring_bits": 32, "fractional_bits": 16}


def test_masked_decode_returns_ring_arrays():
    masked = {"weight": np.arange(6, dtype=np.uint32).reshape(2, 3)}
    envelope = encode_envelope(
        masked,
        study="heart",
        round_number=1,
        site="site-0",
        sample_count=1,
        nonce="0123456789abcdef",
        codec_name="masked",
        codec_params={"fractional_bits": 8},
    )

    decoded = decode_envelope(envelope)

    assert decoded.tensors["weight"].dtype == np.uint32
    np.testing.assert_array_equal(decoded.tensors["weight"], masked["weight"])


def test_masked_codec_rejects_float_input():
    codec = get_codec("masked", {"fractional_bits": 8})

    with pytest.raises(EnvelopeError) as error:
        codec.encode({"weight": np.zeros(3, np.float32)})

    assert str(error.value) == (
        "masked tensor 'weight' has dtype float32, expected uint32: mask it with "
        "MaskingSite first"
    )


def test_masked_codec_rejects_unknown_ring():
    with pytest.raises(ConfigError, match="ring_bits must be 32 or 64, got 8"):
        get_codec("masked", {"ring_bits": 8, "fractional_bits": 8})


def test_masked_payload_size_matches_fp32():
    update = {"weight": np.zeros(100_000, np.float32)}
    common = {
        "study": "heart",
        "round_number": 1,
        "site": "site-0",
        "sample_count": 1,
        "nonce": "0123456789abcdef",
    }

    plain = encode_envelope(update, **common)
    masked = encode_envelope(
        {"weight": np.zeros(100_000, np.uint32)},
        codec_name="masked",
        codec_params={"fractional_bits": 8},
        **common,
    )

    assert len(masked) <= 1.01 * len(plain)
