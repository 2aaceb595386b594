"""Ed25519 signatures on key advertisements.

Without them, an aggregation service could hand the sites its own public
keys in place of a peer's (a man in the middle) and then open that peer's
shares. When every site has the Ed25519 verify keys of the study's sites,
each site signs its advertisement and rejects a roster with an advertisement
that is unsigned or signed by the wrong key. The signed bytes bind the study
and round, so an advertisement cannot be replayed in another round.
"""

import base64
import binascii
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from medfed.contract.secagg.keys import RoundContext
from medfed.contract.secagg.messages import KeyAdvertisement
from medfed.errors import SecureAggregationError

__all__ = [
    "advertisement_signing_bytes",
    "sign_advertisement",
    "verify_advertisement",
]

_DOMAIN = b"medfed-secagg/v1/key-advertisement\x00"


def advertisement_signing_bytes(
    advertisement: KeyAdvertisement, context: RoundContext
) -> bytes:
    """Return the canonical bytes a signature covers: round and advertisement."""
    fields = advertisement.model_dump(mode="json", exclude={"signature"})
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return _DOMAIN + context.to_bytes() + b"\x00" + canonical


def sign_advertisement(
    advertisement: KeyAdvertisement,
    signing_key: Ed25519PrivateKey,
    context: RoundContext,
) -> KeyAdvertisement:
    """Return ``advertisement`` with its Ed25519 signature for ``context``."""
    signature = signing_key.sign(advertisement_signing_bytes(advertisement, context))
    return advertisement.model_copy(
        update={"signature": base64.b64encode(signature).decode("ascii")}
    )


def verify_advertisement(
    advertisement: KeyAdvertisement,
    verify_key: Ed25519PublicKey,
    context: RoundContext,
) -> None:
    """Check the signature of ``advertisement`` against its site's verify key.

    Raises:
        SecureAggregationError: the signature is missing, malformed or does
            not verify; the message names the site.
    """
    if advertisement.signature is None:
        raise SecureAggregationError(
            f"key advertisement of site {advertisement.site!r} is not signed"
        )
    try:
        signature = base64.b64decode(advertisement.signature, validate=True)
        verify_key.verify(
            signature, advertisement_signing_bytes(advertisement, context)
        )
    except (binascii.Error, ValueError, InvalidSignature):
        raise SecureAggregationError(
            f"key advertisement of site {advertisement.site!r} has an invalid "
            "signature: it was altered or not signed with the site's key"
        ) from None
