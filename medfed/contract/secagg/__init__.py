"""Secure aggregation: the service learns only the sum of the sites' updates.

Two mechanisms, both used by sites and by the aggregation service:

* masking, double masking after Bonawitz et al., "Practical Secure
  Aggregation for Privacy-Preserving Machine Learning" (CCS 2017): each site
  adds a self mask and pairwise masks to its update, encoded in fixed point
  (``ring``) or as int8 levels at a shared scale (``int8_ring``), in
  Z_{2^32}; survivors reveal Shamir shares that let the service remove the
  masks of the sum, and only of the sum, even when sites drop out. See
  ``site.MaskingSite`` and ``server.MaskingServer``.
* CKKS homomorphic encryption (TenSEAL, imported lazily) in ``ckks``.

Security model: the service and any set of fewer than ``threshold`` sites
are honest-but-curious, and the service may drop or delay messages. When the
sites have each other's Ed25519 verify keys, they sign their key
advertisements (``signing``) and a service that substitutes a site's keys is
detected; without those keys that attack is out of scope. A service that
tells sites different survivor sets is not detected. The majority threshold
still keeps it from unmasking one site, unless c sites collude with it and
``threshold <= (n + c) / 2``. Wrong revealed shares are detected,
because a rebuilt secret must match its commitment or public key; the service
ignores them and logs the revealing sites while ``threshold`` correct shares
remain, and fails the round otherwise.

Invariants: every site flattens tensors in ``layout.VectorLayout`` order;
``ring.check_ring_capacity`` holds for the round's encoding, so the sum never
wraps; a site reveals a peer's self-mask share or its mask-key share, never
both; the service issues no reveal request with fewer than ``threshold``
survivors.
"""

from medfed.contract.secagg.int8_ring import Int8RingEncoding
from medfed.contract.secagg.layout import VectorLayout
from medfed.contract.secagg.messages import (
    MIN_SITES,
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    RevealedShares,
    RevealRequest,
    ShareUpload,
    check_threshold,
    parse_message,
)
from medfed.contract.secagg.ring import (
    DEFAULT_RING_BITS,
    FixedPointEncoding,
    RingEncoding,
    check_ring_capacity,
    decode_fixed_point,
    encode_fixed_point,
    from_ring,
    to_ring,
)
from medfed.contract.secagg.server import (
    AdvertisementSignatureError,
    MaskingServer,
    RoundNotReadyError,
    UnmaskedSum,
)
from medfed.contract.secagg.site import MaskingSite

__all__ = [
    "DEFAULT_RING_BITS",
    "MIN_SITES",
    "AdvertisementSignatureError",
    "EncryptedShare",
    "FixedPointEncoding",
    "Int8RingEncoding",
    "KeyAdvertisement",
    "KeyRoster",
    "MaskingServer",
    "MaskingSite",
    "RevealRequest",
    "RevealedShares",
    "RingEncoding",
    "RoundNotReadyError",
    "ShareUpload",
    "UnmaskedSum",
    "VectorLayout",
    "check_ring_capacity",
    "check_threshold",
    "decode_fixed_point",
    "encode_fixed_point",
    "from_ring",
    "parse_message",
    "to_ring",
]
