"""The two masks a site adds to its ring vector.

A site ``u`` sends ``y_u = x_u + PRG(b_u) + sum over peers v of s(u, v) * PRG(k_uv)``
modulo ``2^ring_bits``, where ``b_u`` is its self-mask seed, ``k_uv`` the seed
it agreed with peer ``v`` and ``s(u, v)`` is +1 when ``u`` sorts before ``v``
and -1 otherwise. The pairwise terms cancel in the sum over sites that all
uploaded; the service rebuilds and removes the terms of the sites that
dropped out, and the self masks of the sites that did not.
"""

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medfed.contract.secagg.keys import RoundContext, derive_pairwise_secret
from medfed.contract.secagg.prg import expand_mask

__all__ = ["PAIRWISE_MASK_PURPOSE", "pairwise_mask", "self_mask"]

PAIRWISE_MASK_PURPOSE = "pairwise-mask"


def self_mask(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """Return the self mask ``PRG(b_u)`` of ``length`` ring elements."""
    return expand_mask(seed, length, dtype)


def pairwise_mask(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    *,
    context: RoundContext,
    site: str,
    peer: str,
    length: int,
    dtype: np.dtype,
) -> np.ndarray:
    """Return the signed pairwise term ``s(site, peer) * PRG(k)`` that ``site`` adds.

    Either party's private key with the other's public key gives the same
    seed, which is how the service rebuilds a dropped site's terms.
    """
    seed = derive_pairwise_secret(
        private_key,
        peer_public_key,
        purpose=PAIRWISE_MASK_PURPOSE,
        context=context,
        site=site,
        peer=peer,
    )
    mask = expand_mask(seed, length, dtype)
    if site < peer:
        return mask
    return np.zeros_like(mask) - mask
