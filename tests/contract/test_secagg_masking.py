"""The double-masking protocol end to end, with real X25519, HKDF, AES-GCM,
ChaCha20 and Shamir sharing: sums, dropouts, thresholds and leakage."""

import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.contract.secagg import (
    FixedPointEncoding,
    MaskingServer,
    MaskingSite,
    RevealRequest,
    VectorLayout,
    check_threshold,
)
from medfed.contract.secagg.local import run_masking_round
from medfed.contract.secagg.ring import from_ring, to_ring
from medfed.contract.secagg.shamir import PRIME, Share
from medfed.errors import ConfigError, SecureAggregationError

STUDY = "heart"


def site_names(count: int) -> list[str]:
    return [f"site-{index:02d}" for index in range(count)]


def encoding_for(site_count: int, **overrides) -> FixedPointEncoding:
    parameters = {
        "fractional_bits": 12,
        "clip": 8.0,
        "max_weight": 500,
        "site_count": site_count,
    } | overrides
    return FixedPointEncoding(**parameters)


def integer_updates(site_count: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    updates = {
        site: {
            "bias": rng.integers(-8, 9, size=3).astype(np.float32),
            "weight": rng.integers(-8, 9, size=(4, 5)).astype(np.float32),
        }
        for site in site_names(site_count)
    }
    counts = {site: int(rng.integers(1, 501)) for site in updates}
    return updates, counts


def weighted_sum(updates: dict, counts: dict, sites, clip: float = 8.0) -> np.ndarray:
    layout = VectorLayout.of(next(iter(updates.values())))
    return sum(
        np.clip(layout.flatten(updates[site]), -clip, clip) * counts[site]
        for site in sites
    )


@pytest.mark.parametrize("site_count", [3, 4, 7, 10, 20])
def test_integer_sum_exact(site_count):
    updates, counts = integer_updates(site_count, seed=site_count)

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=1,
        threshold=site_count // 2 + 1,
        encoding=encoding_for(site_count),
    )

    np.testing.assert_array_equal(
        outcome.result.weighted_sum, weighted_sum(updates, counts, updates)
    )
    assert outcome.result.sample_count == sum(counts.values())
    assert outcome.result.survivors == tuple(sorted(updates))


@settings(max_examples=15, deadline=None)
@given(
    site_count=st.integers(3, 20),
    seed=st.integers(0, 2**32),
    rounding=st.sampled_from(["nearest", "stochastic"]),
)
def test_float_sum_within_bound(site_count, seed, rounding):
    rng = np.random.default_rng(seed)
    updates = {
        site: {"weight": rng.normal(0.0, 3.0, size=12).astype(np.float32)}
        for site in site_names(site_count)
    }
    counts = {site: int(rng.integers(1, 501)) for site in updates}
    encoding = encoding_for(site_count, rounding=rounding)

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=2,
        threshold=site_count // 2 + 1,
        encoding=encoding,
        rng=rng,
    )

    error = np.abs(outcome.result.weighted_sum - weighted_sum(updates, counts, updates))
    assert error.max() <= encoding.error_bound(site_count)


@pytest.mark.parametrize("site_count", [3, 5, 10, 20])
def test_one_dropout_exact(site_count):
    updates, counts = integer_updates(site_count, seed=100 + site_count)
    dropped = site_names(site_count)[1]

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=3,
        threshold=site_count // 2 + 1,
        encoding=encoding_for(site_count),
        drop_before_upload={dropped},
    )

    survivors = [site for site in updates if site != dropped]
    np.testing.assert_array_equal(
        outcome.result.weighted_sum, weighted_sum(updates, counts, survivors)
    )
    assert outcome.result.sample_count == sum(counts[site] for site in survivors)
    assert dropped not in outcome.result.survivors


@pytest.mark.parametrize("site_count", [3, 5, 10, 20])
def test_max_dropouts_exact(site_count):
    updates, counts = integer_updates(site_count, seed=200 + site_count)
    threshold = site_count // 2 + 1
    # n - t sites drop after sharing keys; t survivors remain.
    dropped = set(site_names(site_count)[::2][: site_count - threshold])

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=4,
        threshold=threshold,
        encoding=encoding_for(site_count),
        drop_before_upload=dropped,
    )

    survivors = [site for site in updates if site not in dropped]
    assert len(survivors) == threshold
    np.testing.assert_array_equal(
        outcome.result.weighted_sum, weighted_sum(updates, counts, survivors)
    )


def test_dropout_during_reveal_still_unmasks():
    updates, counts = integer_updates(7, seed=5)
    sites = site_names(7)

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=5,
        threshold=4,
        encoding=encoding_for(7),
        drop_before_upload={sites[0]},
        drop_before_reveal={sites[1], sites[2]},
    )

    # A site that uploaded but then went silent is still in the sum.
    survivors = sites[1:]
    np.testing.assert_array_equal(
        outcome.result.weighted_sum, weighted_sum(updates, counts, survivors)
    )


def test_too_few_survivors_rejected():
    updates, counts = integer_updates(10, seed=6)
    dropped = set(site_names(10)[:5])

    with pytest.raises(SecureAggregationError) as error:
        run_masking_round(
            updates,
            counts,
            study=STUDY,
            round_number=6,
            threshold=6,
            encoding=encoding_for(10),
            drop_before_upload=dropped,
        )

    assert str(error.value) == (
        "only 5 sites uploaded masked updates, fewer than the threshold 6; the "
        "round is abandoned and nothing is unmasked"
    )


def test_too_few_reveals_rejected():
    updates, counts = integer_updates(5, seed=7)

    with pytest.raises(SecureAggregationError) as error:
        run_masking_round(
            updates,
            counts,
            study=STUDY,
            round_number=7,
            threshold=3,
            encoding=encoding_for(5),
            drop_before_reveal=set(site_names(5)[:3]),
        )

    assert str(error.value) == (
        "only 2 survivors revealed shares, fewer than the threshold 3; nothing is "
        "unmasked"
    )


def test_masked_vectors_uncorrelated_and_uniform():
    site_count = 5
    length = 50_000
    rng = np.random.default_rng(8)
    # Strongly structured updates: a ramp, a constant and sparse spikes.
    updates = {
        "site-00": {"weight": np.linspace(-1, 1, length).astype(np.float32)},
        "site-01": {"weight": np.full(length, 0.5, np.float32)},
        "site-02": {"weight": np.zeros(length, np.float32)},
        "site-03": {"weight": (rng.random(length) < 0.01).astype(np.float32)},
        "site-04": {"weight": rng.normal(0, 0.3, length).astype(np.float32)},
    }
    counts = dict.fromkeys(updates, 100)

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=8,
        threshold=3,
        encoding=encoding_for(site_count),
    )

    # |r| of independent vectors is about 1/sqrt(length) = 0.0045.
    for masked in outcome.masked_vectors.values():
        masked_values = masked.astype(np.float64)
        for site, update in updates.items():
            values = update["weight"].astype(np.float64)
            if values.std() == 0:
                continue
            correlation = np.corrcoef(masked_values, values)[0, 1]
            assert abs(correlation) < 0.03, site
        # The top 4 bits of a uniform uint32 fall in 16 equally likely bins.
        counts_per_bin = np.bincount(masked >> 28, minlength=16)
        expected = length / 16
        chi_square = float(((counts_per_bin - expected) ** 2 / expected).sum())
        # 15 degrees of freedom: P(chi-square > 50) < 1e-5.
        assert chi_square < 50
        assert abs(masked_values.mean() / 2**32 - 0.5) < 0.01


def test_masked_vector_differs_from_encoding():
    updates = {site: {"weight": np.zeros(16, np.float32)} for site in site_names(3)}

    outcome = run_masking_round(
        updates,
        dict.fromkeys(updates, 1),
        study=STUDY,
        round_number=9,
        threshold=2,
        encoding=encoding_for(3),
    )

    for masked in outcome.masked_vectors.values():
        # An all-zero update is encoded as zeros; masked, almost nothing is zero.
        assert np.count_nonzero(masked) >= 15


class Round:
    """A masking round driven step by step, for tests of single messages."""

    def __init__(self, site_count: int = 5, threshold: int = 3, round_number: int = 10):
        self.encoding = encoding_for(site_count)
        self.names = site_names(site_count)
        self.sites = {
            name: MaskingSite(
                site=name,
                study=STUDY,
                round_number=round_number,
                encoding=self.encoding,
            )
            for name in self.names
        }
        self.server = MaskingServer(
            study=STUDY,
            round_number=round_number,
            threshold=threshold,
            encoding=self.encoding,
            vector_length=4,
        )
        for site in self.sites.values():
            self.server.add_advertisement(site.advertise())
        self.roster = self.server.close_advertising()
        self.uploads = {
            name: site.share_keys(self.roster) for name, site in self.sites.items()
        }

    def share(self) -> None:
        for upload in self.uploads.values():
            self.server.add_share_upload(upload)
        self.server.close_sharing()
        for name, site in self.sites.items():
            site.receive_shares(self.server.shares_for(name))

    def upload(self, names, vectors=None) -> None:
        for name in names:
            vector = np.arange(4, dtype=np.uint32) if vectors is None else vectors[name]
            self.server.add_masked_update(
                name, self.sites[name].mask_vector(vector), sample_count=1
            )


def test_threshold_rule_messages():
    with pytest.raises(ConfigError) as error:
        check_threshold(2, 4)
    assert str(error.value) == "threshold must be more than half of the 4 sites, got 2"

    with pytest.raises(ConfigError) as error:
        check_threshold(6, 5)
    assert str(error.value) == "threshold must be at most the 5 sites, got 6"

    with pytest.raises(ConfigError) as error:
        check_threshold(2, 2)
    assert str(error.value) == "secure aggregation needs at least 3 sites, got 2"


def test_site_rejects_both_shares_of_one_site():
    round_ = Round()
    round_.share()
    round_.upload(round_.names)
    request = RevealRequest(
        study=STUDY,
        round=10,
        survivors=round_.names,
        dropped=[round_.names[1]],
    )

    with pytest.raises(SecureAggregationError) as error:
        round_.sites[round_.names[0]].reveal(request)

    assert "lists sites ['site-01'] as both survivors and dropped" in str(error.value)


def test_site_rejects_reveal_below_threshold():
    round_ = Round()
    round_.share()
    round_.upload(round_.names)
    request = RevealRequest(
        study=STUDY, round=10, survivors=round_.names[:2], dropped=round_.names[2:]
    )

    with pytest.raises(SecureAggregationError) as error:
        round_.sites[round_.names[0]].reveal(request)

    assert str(error.value) == (
        "reveal request lists 2 survivors, fewer than the threshold 3; no shares "
        "are revealed"
    )


def test_site_rejects_reveal_for_other_round():
    round_ = Round()
    round_.share()
    round_.upload(round_.names)
    request = RevealRequest(study=STUDY, round=11, survivors=round_.names, dropped=[])

    with pytest.raises(SecureAggregationError, match="is for study 'heart' round 11"):
        round_.sites[round_.names[0]].reveal(request)


def test_site_rejects_tampered_share():
    round_ = Round()
    for upload in round_.uploads.values():
        round_.server.add_share_upload(upload)
    round_.server.close_sharing()
    relayed = round_.server.shares_for("site-00")
    original = relayed[0]
    flipped = "A" if original.ciphertext[0] != "A" else "B"
    relayed[0] = original.model_copy(
        update={"ciphertext": flipped + original.ciphertext[1:]}
    )

    with pytest.raises(SecureAggregationError) as error:
        round_.sites["site-00"].receive_shares(relayed)

    assert str(error.value) == (
        f"share from site {original.sender!r} failed decryption: it was altered or "
        "not sealed for this site and round"
    )


def test_site_rejects_roster_with_foreign_keys():
    donor = Round(round_number=12)
    victim = MaskingSite(
        site="site-00", study=STUDY, round_number=12, encoding=donor.encoding
    )
    victim.advertise()

    with pytest.raises(SecureAggregationError) as error:
        victim.share_keys(donor.roster)

    assert str(error.value) == (
        "roster carries keys for site 'site-00' that are not its own; the "
        "aggregation service may be tampering with the sites' public keys "
        "(a man in the middle)"
    )


def test_site_rejects_steps_out_of_order():
    site = MaskingSite(
        site="site-00", study=STUDY, round_number=1, encoding=encoding_for(3)
    )

    with pytest.raises(SecureAggregationError) as error:
        site.mask_vector(np.zeros(4, np.uint32))

    assert str(error.value) == (
        "site 'site-00' cannot mask an update in phase advertise; expected phase mask"
    )


def test_server_rejects_late_upload():
    round_ = Round()
    round_.share()
    round_.upload(round_.names[:4])
    round_.server.close_uploads()
    late = round_.sites[round_.names[4]].mask_vector(np.zeros(4, np.uint32))

    with pytest.raises(SecureAggregationError) as error:
        round_.server.add_masked_update(round_.names[4], late, sample_count=1)

    assert str(error.value) == (
        "round 10 cannot accept masked updates in phase revealing; expected phase "
        "uploading"
    )


def test_server_rejects_wrong_dtype():
    round_ = Round()
    round_.share()

    with pytest.raises(SecureAggregationError) as error:
        round_.server.add_masked_update(
            "site-00", np.zeros(4, np.float32), sample_count=1
        )

    assert str(error.value) == (
        "masked update from 'site-00' has shape [4] and dtype float32, expected "
        "[4] uint32"
    )


def test_server_rejects_upload_without_shares():
    round_ = Round()
    for name in round_.names[:4]:
        round_.server.add_share_upload(round_.uploads[name])
    round_.server.close_sharing()

    with pytest.raises(SecureAggregationError) as error:
        round_.server.add_masked_update(
            round_.names[4], np.zeros(4, np.uint32), sample_count=1
        )

    assert "did not upload shares, so its masked update cannot be unmasked" in str(
        error.value
    )


def reveal_with_wrong_shares(round_, wrong_revealers, site):
    """Reveal every site's shares, with ``site``'s self-mask share altered in
    the reveals of ``wrong_revealers``."""
    round_.share()
    round_.upload(round_.names)
    request = round_.server.close_uploads()
    for name in round_.names:
        revealed = round_.sites[name].reveal(request)
        if name in wrong_revealers:
            share = revealed.self_mask_shares[site]
            # A random field element: small structured changes to two shares
            # can cancel at x = 0 and rebuild the right secret by chance.
            random_value = Share(share.index, secrets.randbelow(PRIME)).value_hex()
            wrong = share.model_copy(update={"value": random_value})
            revealed = revealed.model_copy(
                update={"self_mask_shares": {**revealed.self_mask_shares, site: wrong}}
            )
        round_.server.add_reveal(revealed)


def test_server_ignores_one_wrong_share(caplog):
    round_ = Round()
    reveal_with_wrong_shares(round_, {"site-00"}, "site-03")

    with caplog.at_level("WARNING", logger="medfed.contract.secagg.server"):
        result = round_.server.unmask()

    np.testing.assert_array_equal(
        from_ring(result.ring_sum), 5 * np.arange(4, dtype=np.int64)
    )
    assert (
        "sites ['site-00'] revealed wrong shares of the self-mask seed of site "
        "site-03; they were ignored"
    ) in caplog.text


def test_server_rejects_too_many_wrong_shares():
    round_ = Round()
    reveal_with_wrong_shares(round_, {"site-00", "site-01", "site-02"}, "site-03")

    with pytest.raises(SecureAggregationError) as error:
        round_.server.unmask()

    assert str(error.value) == (
        "could not rebuild the self-mask seed of site 'site-03': no set of 3 of the "
        "5 shares rebuilds a secret that passes its check in 1000 attempts: too "
        "many shares are wrong"
    )


def test_server_rejects_reveal_with_extra_site():
    round_ = Round()
    round_.share()
    round_.upload(round_.names[:4])
    request = round_.server.close_uploads()
    revealed = round_.sites["site-00"].reveal(request)
    extra = revealed.model_copy(
        update={
            "self_mask_shares": {
                **revealed.self_mask_shares,
                "site-04": revealed.mask_key_shares["site-04"],
            }
        }
    )

    with pytest.raises(SecureAggregationError) as error:
        round_.server.add_reveal(extra)

    assert str(error.value) == (
        "site 'site-00' must reveal self-mask shares of exactly the survivors and "
        "mask-key shares of exactly the dropped sites"
    )


def test_server_needs_threshold_advertisements():
    encoding = encoding_for(5)
    server = MaskingServer(
        study=STUDY, round_number=1, threshold=3, encoding=encoding, vector_length=4
    )
    for name in site_names(2):
        site = MaskingSite(site=name, study=STUDY, round_number=1, encoding=encoding)
        server.add_advertisement(site.advertise())

    with pytest.raises(SecureAggregationError) as error:
        server.close_advertising()

    assert str(error.value) == (
        "cannot start the round with 2 sites: secure aggregation needs at least 3 "
        "sites, got 2"
    )


def test_server_rejects_roster_beyond_encoding():
    encoding = encoding_for(3)
    server = MaskingServer(
        study=STUDY, round_number=1, threshold=3, encoding=encoding, vector_length=4
    )
    for name in site_names(4):
        site = MaskingSite(site=name, study=STUDY, round_number=1, encoding=encoding)
        server.add_advertisement(site.advertise())

    with pytest.raises(SecureAggregationError) as error:
        server.close_advertising()

    assert str(error.value) == (
        "4 sites advertised keys but the encoding is sized for at most 3; the sum "
        "could wrap around"
    )


@settings(max_examples=20, deadline=None)
@given(data=st.data(), site_count=st.integers(3, 12))
def test_random_dropouts_exact(data, site_count):
    threshold = data.draw(st.integers(site_count // 2 + 1, site_count))
    names = site_names(site_count)
    upload_drops = data.draw(
        st.sets(st.sampled_from(names), max_size=site_count - threshold)
    )
    survivors = [name for name in names if name not in upload_drops]
    reveal_drops = data.draw(
        st.sets(st.sampled_from(survivors), max_size=len(survivors) - threshold)
    )
    updates, counts = integer_updates(site_count, seed=data.draw(st.integers(0, 999)))

    outcome = run_masking_round(
        updates,
        counts,
        study=STUDY,
        round_number=13,
        threshold=threshold,
        encoding=encoding_for(site_count),
        drop_before_upload=upload_drops,
        drop_before_reveal=reveal_drops,
    )

    np.testing.assert_array_equal(
        outcome.result.weighted_sum, weighted_sum(updates, counts, survivors)
    )


def test_integer_quantizer_composes_with_masking():
    # Any quantizer whose integers share one scale across the round can feed
    # to_ring in place of the fixed-point encoder; int8 values here.
    round_ = Round()
    round_.share()
    rng = np.random.default_rng(9)
    quantized = {
        name: rng.integers(-128, 128, size=4, dtype=np.int64) for name in round_.names
    }
    round_.upload(
        round_.names, {name: to_ring(value, 32) for name, value in quantized.items()}
    )
    request = round_.server.close_uploads()
    for name in round_.names:
        round_.server.add_reveal(round_.sites[name].reveal(request))

    result = round_.server.unmask()

    np.testing.assert_array_equal(from_ring(result.ring_sum), sum(quantized.values()))
