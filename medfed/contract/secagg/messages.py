"""The plain-data messages of one masking round, in protocol order.

Every message is a frozen pydantic model that travels as JSON; nothing is
pickled. Keys are base64 of their 32 raw bytes, share values are hex.

1. ``KeyAdvertisement``: site to service, then the service returns every
   advertisement of the round as a ``KeyRoster``.
2. ``ShareUpload``: site to service, one ``EncryptedShare`` per other site;
   the service relays each to its recipient and cannot read it.
3. The masked update: an envelope with the ``masked`` codec.
4. ``RevealRequest``: service to each surviving site; ``RevealedShares`` back.
"""

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medfed.contract.ids import IDENTIFIER_PATTERN
from medfed.errors import ConfigError, SecureAggregationError

__all__ = [
    "MIN_SITES",
    "EncryptedShare",
    "KeyAdvertisement",
    "KeyRoster",
    "RevealRequest",
    "RevealedShares",
    "SharePlaintext",
    "ShareUpload",
    "ShareValue",
    "check_threshold",
    "parse_message",
]

#: With two sites, each one can subtract its own update from the sum and read
#: the other's, so a masking round needs at least three.
MIN_SITES = 3
_MAX_SITES = 10_000

Identifier = Annotated[str, Field(pattern=IDENTIFIER_PATTERN.pattern)]
Base64Key = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]{43}=$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

_Model = TypeVar("_Model", bound=BaseModel)


def check_threshold(threshold: int, site_count: int) -> None:
    """Check a Shamir threshold ``t`` for a round of ``site_count`` sites.

    The rule is ``site_count / 2 < t <= site_count``. A surviving site reveals
    either the self-mask share or the mask-key share of each peer, never
    both. With more than half required for each secret, a service that tells
    different sites different stories about who dropped out cannot collect
    enough of both to unmask one site's update. That holds while no site
    colludes with the service: c colluding sites break it once
    ``t <= (site_count + c) / 2``, so studies that fear collusion should
    choose a higher threshold.

    Raises:
        ConfigError: the site count is below ``MIN_SITES`` or the threshold
            breaks the rule.
    """
    if site_count < MIN_SITES:
        raise ConfigError(
            f"secure aggregation needs at least {MIN_SITES} sites, got {site_count}"
        )
    if not isinstance(threshold, int) or not site_count < 2 * threshold:
        raise ConfigError(
            f"threshold must be more than half of the {site_count} sites, "
            f"got {threshold!r}"
        )
    if threshold > site_count:
        raise ConfigError(
            f"threshold must be at most the {site_count} sites, got {threshold}"
        )


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyAdvertisement(_Message):
    """A site's public keys and self-mask commitment for one round.

    ``signature`` is the base64 Ed25519 signature described in ``signing``,
    or None in studies without site signing keys.
    """

    site: Identifier
    mask_public_key: Base64Key
    share_public_key: Base64Key
    self_mask_commitment: Sha256Hex
    signature: str | None = Field(default=None, pattern=r"^[A-Za-z0-9+/]{86}==$")


class KeyRoster(_Message):
    """Every site that advertised keys; share indexes follow this order."""

    study: Identifier
    round: int = Field(ge=0, le=1_000_000)
    threshold: int
    advertisements: list[KeyAdvertisement] = Field(max_length=_MAX_SITES)

    @model_validator(mode="after")
    def _consistent(self) -> "KeyRoster":
        sites = [item.site for item in self.advertisements]
        if sites != sorted(set(sites)):
            raise ValueError("advertisements must be sorted by site, each site once")
        keys = [item.mask_public_key for item in self.advertisements] + [
            item.share_public_key for item in self.advertisements
        ]
        if len(set(keys)) != len(keys):
            raise ValueError("two advertisements carry the same public key")
        try:
            check_threshold(self.threshold, len(sites))
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return self

    @property
    def sites(self) -> list[str]:
        return [item.site for item in self.advertisements]

    def share_index(self, site: str) -> int:
        """Return ``site``'s Shamir x-coordinate: its 1-based roster position."""
        return self.sites.index(site) + 1

    def advertisement(self, site: str) -> KeyAdvertisement:
        for item in self.advertisements:
            if item.site == site:
                return item
        raise SecureAggregationError(f"site {site!r} is not in the round's roster")


class ShareValue(_Message):
    """One Shamir share: its index and its field element as 33 bytes of hex."""

    index: int = Field(ge=1, le=_MAX_SITES)
    value: str = Field(pattern=r"^[0-9a-f]{66}$")


class SharePlaintext(_Message):
    """The plaintext sealed in ``EncryptedShare.ciphertext``."""

    sender: Identifier
    recipient: Identifier
    self_mask_share: ShareValue
    mask_key_share: ShareValue


class EncryptedShare(_Message):
    """A ``SharePlaintext`` sealed with AES-256-GCM for ``recipient``."""

    sender: Identifier
    recipient: Identifier
    nonce: str = Field(pattern=r"^[A-Za-z0-9+/]{16}$")
    ciphertext: str = Field(min_length=1, max_length=4096)


class ShareUpload(_Message):
    """A site's encrypted shares, one for every other site of the roster."""

    sender: Identifier
    shares: list[EncryptedShare] = Field(max_length=_MAX_SITES)


class RevealRequest(_Message):
    """The survivors (sites that uploaded) and the dropped sites (shared keys only)."""

    study: Identifier
    round: int = Field(ge=0, le=1_000_000)
    survivors: list[Identifier] = Field(max_length=_MAX_SITES)
    dropped: list[Identifier] = Field(max_length=_MAX_SITES)


class RevealedShares(_Message):
    """A survivor's shares: self-mask shares of survivors, mask-key shares of
    dropped sites."""

    site: Identifier
    self_mask_shares: dict[Identifier, ShareValue]
    mask_key_shares: dict[Identifier, ShareValue]


def parse_message(model: type[_Model], data: str | bytes | dict[str, Any]) -> _Model:
    """Validate JSON text or a decoded dict as ``model``.

    Raises:
        SecureAggregationError: the data does not match the model; the message
            names the first invalid fields.
    """
    try:
        if isinstance(data, dict):
            return model.model_validate(data)
        return model.model_validate_json(data)
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or model.__name__}: "
            f"{item['msg']}"
            for item in error.errors()[:3]
        )
        raise SecureAggregationError(
            f"invalid {model.__name__} message: {details}"
        ) from None
