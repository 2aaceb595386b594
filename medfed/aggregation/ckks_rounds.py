"""CKKS secure aggregation inside the aggregation service's round lifecycle.

``RoundService`` calls these functions when a study's settings choose
``secure_aggregation: ckks``. A round then runs in three steps:

1. Each site uploads its clipped, sample-weighted update encrypted under the
   study's CKKS key, as an envelope with the ``ckks`` codec, through the
   normal upload route. ``check_encrypted_upload`` loads every ciphertext
   before the upload is stored.
2. The first finalize call that meets the quorum closes uploads: the sites
   that uploaded become the contributors, and ``sum_encrypted_uploads`` adds
   their ciphertexts. Sites download the encrypted sum from
   ``GET .../ckks/sum``.
3. One site decrypts the sum and sends it back in an ``fp32`` envelope to
   ``PUT .../ckks/decrypted/{site}``; ``read_decrypted_sum`` checks it. The
   next finalize call applies the study's strategy to that weighted sum.

The service has no secret key, because it builds its context from the
study's parameters (``CkksAggregator``). It can add ciphertexts but never
decrypt one. It sees no site's update in plaintext, only the decrypted sum of all
contributors.
"""

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from safetensors.numpy import save as save_safetensors

from medfed.aggregation.secure import apply_weighted_sum
from medfed.aggregation.store import EncryptedSum, StoredUpload
from medfed.aggregation.strategies import Strategy, Weights
from medfed.contract.codecs.ckks import (
    ciphertext_arrays,
    ciphertexts_from_arrays,
    codec_params,
)
from medfed.contract.secagg.ckks import CkksAggregator
from medfed.contract.secagg.config import SecureAggregationConfig
from medfed.contract.secagg.layout import VectorLayout
from medfed.contract.wire import DecodedUpdate, EnvelopeLimits, decode_envelope
from medfed.errors import SecureAggregationError

__all__ = [
    "apply_decrypted_sum",
    "check_encrypted_upload",
    "read_decrypted_sum",
    "sum_encrypted_uploads",
]

logger = logging.getLogger(__name__)


def check_encrypted_upload(
    settings: SecureAggregationConfig, decoded: DecodedUpdate, layout: VectorLayout
) -> None:
    """Check that an upload is a ``ckks`` envelope the round can add.

    Raises:
        SecureAggregationError: the codec or its parameters differ from the
            study's, the sample count exceeds ``max_weight``, or a ciphertext
            is unreadable, of the wrong length, scale or level.
    """
    header = decoded.header
    parameters = settings.ckks_parameters()
    expected = codec_params(parameters)
    if header.codec.name != "ckks" or header.codec.params != expected:
        raise SecureAggregationError(
            f"envelope codec is {header.codec.name!r} with {header.codec.params}; "
            f"this study uses CKKS secure aggregation and expects 'ckks' with "
            f"{expected}"
        )
    if header.sample_count > settings.max_weight:
        raise SecureAggregationError(
            f"sample_count {header.sample_count} exceeds secure_aggregation."
            f"max_weight {settings.max_weight}, on which the CKKS capacity check "
            "relies"
        )
    aggregator = CkksAggregator(vector_length=layout.length, parameters=parameters)
    aggregator.validate(header.site, ciphertexts_from_arrays(decoded.tensors))


def sum_encrypted_uploads(
    settings: SecureAggregationConfig,
    uploads: Sequence[StoredUpload],
    layout: VectorLayout,
    limits: EnvelopeLimits,
) -> bytes:
    """Add the uploads' ciphertexts; return the sum as a safetensors file.

    Raises:
        SecureAggregationError: no upload, or a stored ciphertext no longer
            loads (the service's TenSEAL changed since it accepted it).
    """
    aggregator = CkksAggregator(
        vector_length=layout.length, parameters=settings.ckks_parameters()
    )
    for upload in uploads:
        decoded = decode_envelope(upload.envelope, limits)
        aggregator.add(
            upload.site,
            ciphertexts_from_arrays(decoded.tensors),
            sample_count=upload.sample_count,
        )
    return save_safetensors(ciphertext_arrays(aggregator.aggregate()))


def read_decrypted_sum(
    settings: SecureAggregationConfig,
    decoded: DecodedUpdate,
    closed: EncryptedSum,
    layout: VectorLayout,
) -> np.ndarray:
    """Return the weighted sum in a site's decrypted-sum envelope, checked.

    The envelope must use the ``fp32`` codec and carry the contributors'
    total sample count. No value may exceed ``sample_count * clip`` (the
    largest sum of clipped, weighted updates) by more than the release
    rounding, which catches a site that decrypted with a different key.

    Raises:
        SecureAggregationError: the envelope breaks one of these rules.
    """
    header = decoded.header
    if header.codec.name != "fp32":
        raise SecureAggregationError(
            f"a decrypted sum must use codec 'fp32', got {header.codec.name!r}"
        )
    if header.sample_count != closed.sample_count:
        raise SecureAggregationError(
            f"decrypted sum has sample_count {header.sample_count}, but the "
            f"contributors {closed.contributors} have {closed.sample_count}"
        )
    vector = layout.join(decoded.tensors)
    parameters = settings.ckks_parameters()
    # Float32 keeps about 7 significant digits of each value.
    bound = closed.sample_count * settings.clip * (1 + 1e-6) + parameters.release_grid
    largest = float(np.max(np.abs(vector))) if vector.size else 0.0
    if largest > bound:
        raise SecureAggregationError(
            f"decrypted sum has a value of magnitude {largest:.6g}, more than "
            f"sample_count x clip = {closed.sample_count * settings.clip:.6g}; the "
            "decrypting site may hold another CKKS secret context than the others"
        )
    return vector


def apply_decrypted_sum(
    strategy: Strategy,
    global_weights: Mapping[str, np.ndarray],
    settings: SecureAggregationConfig,
    closed: EncryptedSum,
    layout: VectorLayout,
    limits: EnvelopeLimits,
) -> Weights:
    """Apply ``strategy`` to the round's decrypted sum; return the new weights."""
    assert closed.decrypted is not None
    decoded = decode_envelope(closed.decrypted, limits)
    vector = read_decrypted_sum(settings, decoded, closed, layout)
    logger.info(
        "applying the decrypted sum of round %s of study %s from %s sites",
        closed.round,
        closed.study,
        len(closed.contributors),
    )
    return apply_weighted_sum(
        strategy,
        global_weights,
        vector,
        closed.sample_count,
        site_count=len(closed.contributors),
    )
