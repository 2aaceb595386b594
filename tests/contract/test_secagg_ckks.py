"""CKKS aggregation with TenSEAL: precision, chunking and key separation."""

import numpy as np
import pytest

pytest.importorskip("tenseal")

from medfed.contract.secagg.ckks import (
    CkksAggregator,
    CkksParameters,
    CkksSiteContext,
    check_ckks_capacity,
    round_for_release,
)
from medfed.errors import ConfigError, SecureAggregationError

# Measured maximum error of a 20-site sum with the default parameters was
# about 4e-5 in weighted units; the assertion keeps a 25x margin.
PRECISION = 1e-3


@pytest.fixture(scope="module")
def site_context():
    return CkksSiteContext.create()


def run_round(site_context, updates, counts, clip=1.0):
    length = sum(value.size for value in next(iter(updates.values())).values())
    aggregator = CkksAggregator(site_context.public_bytes(), vector_length=length)
    for site, update in updates.items():
        chunks = site_context.encrypt_update(
            update, sample_count=counts[site], clip=clip
        )
        aggregator.add(site, chunks, sample_count=counts[site])
    return aggregator, site_context.decrypt_vector(aggregator.aggregate(), length)


@pytest.mark.parametrize("site_count", [3, 20])
def test_sum_within_precision(site_context, site_count):
    rng = np.random.default_rng(site_count)
    updates = {
        f"site-{index}": {"weight": rng.uniform(-1, 1, 9000).astype(np.float32)}
        for index in range(site_count)
    }
    counts = {site: int(rng.integers(1, 1000)) for site in updates}

    aggregator, decrypted = run_round(site_context, updates, counts)

    expected = sum(
        updates[site]["weight"].astype(np.float64) * counts[site] for site in updates
    )
    assert np.max(np.abs(decrypted - expected)) < PRECISION
    assert aggregator.sample_count == sum(counts.values())


def test_update_clipped_before_weighting(site_context):
    updates = {
        f"site-{index}": {"weight": np.array([5.0, -5.0, 0.5])} for index in range(3)
    }

    _, decrypted = run_round(site_context, updates, dict.fromkeys(updates, 2))

    np.testing.assert_allclose(decrypted, [6.0, -6.0, 3.0], atol=PRECISION)


def test_public_context_has_no_secret_key(site_context):
    aggregator = CkksAggregator(site_context.public_bytes(), vector_length=3)
    chunks = site_context.encrypt_vector(np.array([1.0, 2.0, 3.0]))
    aggregator.add("site-0", chunks, sample_count=1)

    import tenseal as ts

    public = ts.context_from(site_context.public_bytes())
    assert not public.is_private()
    assert not public.has_secret_key()
    summed = ts.ckks_vector_from(public, aggregator.aggregate()[0])
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        summed.decrypt()


def test_aggregator_rejects_secret_context(site_context):
    with pytest.raises(SecureAggregationError) as error:
        CkksAggregator(site_context.secret_bytes(), vector_length=3)

    assert str(error.value) == (
        "the aggregation service received a CKKS context with a secret key; send "
        "it the public context only"
    )


def test_secret_context_shared_between_sites(site_context):
    other_site = CkksSiteContext.from_bytes(
        site_context.secret_bytes(), CkksParameters()
    )
    chunks = other_site.encrypt_vector(np.array([0.5, -0.25]))

    decrypted = site_context.decrypt_vector(chunks, 2)

    np.testing.assert_allclose(decrypted, [0.5, -0.25], atol=PRECISION)


def test_update_chunked_to_slot_count(site_context):
    chunks = site_context.encrypt_vector(np.zeros(10_000))

    assert len(chunks) == 3  # 4096 + 4096 + 1808 slots


def test_aggregator_rejects_wrong_length(site_context):
    aggregator = CkksAggregator(site_context.public_bytes(), vector_length=10_000)
    chunks = site_context.encrypt_vector(np.zeros(9_000))

    with pytest.raises(SecureAggregationError) as error:
        aggregator.add("site-0", chunks, sample_count=1)

    assert "does not fit an update of 10000" in str(error.value)


def test_aggregator_rejects_garbage(site_context):
    aggregator = CkksAggregator(site_context.public_bytes(), vector_length=3)

    with pytest.raises(SecureAggregationError) as error:
        aggregator.add("site-0", [b"not a ciphertext"], sample_count=1)

    assert str(error.value) == (
        "ciphertext 0 from 'site-0' is unreadable: failed to parse CKKS stream"
    )


def test_aggregator_rejects_second_contribution(site_context):
    aggregator = CkksAggregator(site_context.public_bytes(), vector_length=2)
    chunks = site_context.encrypt_vector(np.zeros(2))
    aggregator.add("site-0", chunks, sample_count=1)

    with pytest.raises(
        SecureAggregationError, match="site 'site-0' already contributed"
    ):
        aggregator.add("site-0", chunks, sample_count=1)


def test_ciphertext_bytes_eight_times_plain(site_context):
    chunks = site_context.encrypt_vector(np.zeros(4096))

    ratio = sum(len(chunk) for chunk in chunks) / (4096 * 4)

    assert 7.9 < ratio < 8.2


def test_capacity_rejects_overflow():
    with pytest.raises(ConfigError) as error:
        check_ckks_capacity(
            parameters=CkksParameters(scale_bits=50),
            clip=1.0,
            max_weight=100_000,
            site_count=20,
        )

    assert str(error.value) == (
        "the CKKS sum can overflow: site_count 20 x max_weight 100000 x clip 1.0 at "
        "scale 2^50 needs 76 bits but the data modulus has 60; lower scale_bits or "
        "add a modulus"
    )


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"poly_modulus_degree": 2048}, "poly_modulus_degree must be one of"),
        ({"coeff_mod_bit_sizes": (60,)}, "coeff_mod_bit_sizes needs at least two"),
        (
            {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 60)},
            "total 120 bits exceeds 109, the 128-bit security limit",
        ),
        ({"scale_bits": 60}, "scale_bits must be from 20 to below the first modulus"),
    ],
)
def test_parameters_rejected(parameters, message):
    with pytest.raises(ConfigError, match=message):
        CkksParameters(**parameters)


def test_aggregator_from_parameters_holds_no_key(site_context):
    aggregator = CkksAggregator(vector_length=3, parameters=CkksParameters())
    aggregator.add("site-0", site_context.encrypt_vector(np.ones(3)), sample_count=1)
    aggregator.add("site-1", site_context.encrypt_vector(np.ones(3)), sample_count=1)

    decrypted = site_context.decrypt_vector(aggregator.aggregate(), 3)

    assert not aggregator._context.is_private()
    np.testing.assert_allclose(decrypted, [2.0, 2.0, 2.0], atol=PRECISION)


def test_aggregator_rejects_other_scale(site_context):
    other = CkksSiteContext.from_bytes(
        site_context.secret_bytes(), CkksParameters(scale_bits=25)
    )
    aggregator = CkksAggregator(vector_length=3, parameters=CkksParameters())

    with pytest.raises(SecureAggregationError) as error:
        aggregator.validate("site-0", other.encrypt_vector(np.ones(3)))

    assert str(error.value) == (
        "ciphertext 0 from 'site-0' has scale 33554432.0; the study encrypts at "
        "scale 1073741824.0"
    )


def test_aggregator_rejects_corrupt_ciphertext(site_context):
    chunk = bytearray(site_context.encrypt_vector(np.ones(3))[0])
    chunk[100] ^= 0xFF
    aggregator = CkksAggregator(vector_length=3, parameters=CkksParameters())

    with pytest.raises(SecureAggregationError) as error:
        aggregator.validate("site-0", [bytes(chunk)])

    assert str(error.value) == (
        "ciphertext 0 from 'site-0' is unreadable: ciphertext data is invalid"
    )


def test_secret_context_for_other_parameters_rejected(site_context):
    with pytest.raises(SecureAggregationError) as error:
        CkksSiteContext.from_bytes(
            site_context.secret_bytes(),
            CkksParameters(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 60)),
        )

    assert "made for other encryption parameters than poly_modulus_degree 16384" in (
        str(error.value)
    )


def test_release_rounds_to_grid():
    parameters = CkksParameters()
    vector = np.array([0.1234567, -3.0000001, 1e-6])

    released = round_for_release(vector, parameters)

    assert parameters.release_grid == 2.0**-10
    np.testing.assert_array_equal(released / 2.0**-10, np.round(released / 2.0**-10))
    assert np.max(np.abs(released - vector)) <= 2.0**-11
    assert released[2] == 0.0
