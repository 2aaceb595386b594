"""A site's Ed25519 keys for signed masking key advertisements, from its kit.

In deployment mode a site signs its key advertisement with the kit's
Ed25519 signing key, the one that also signs its update envelopes. It checks
every advertisement of the roster against the site registry in its kit, so
an aggregation service that swaps a peer's public keys for its own is
caught before the site shares any secret. The registry is trusted as
provisioning wrote it, so an attacker who can change a site's kit can also
change the keys it trusts. Local mode has no kit, and its advertisements are unsigned.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from medfed.contract.kits import KitFiles
from medfed.contract.signing import key_id_for, load_private_key, load_site_registry
from medfed.errors import ConfigError

__all__ = ["AdvertisementKeys", "load_advertisement_keys"]


@dataclass(frozen=True)
class AdvertisementKeys:
    """A site's signing key and the verify key of every site of its study."""

    signing_key: Ed25519PrivateKey
    verify_keys: Mapping[str, Ed25519PublicKey]


def load_advertisement_keys(
    kit_dir: Path, *, study: str, site: str
) -> AdvertisementKeys:
    """Read ``site``'s signing key and the study's site registry from its kit.

    Raises:
        ConfigError: the kit has no signing key or no registry, the registry
            is for another study, or its entry for ``site`` is missing or is
            not the public key of the kit's signing key.
    """
    signing_key = load_private_key(kit_dir / KitFiles.SIGNING_KEY)
    registry_path = kit_dir / KitFiles.SITE_REGISTRY
    if not registry_path.is_file():
        raise ConfigError(
            f"startup kit {kit_dir} has no {KitFiles.SITE_REGISTRY}, which a site "
            "needs to check the other sites' masking keys: copy it from the "
            "coordinator's kit of the same provisioning, or provision the study again"
        )
    verify_keys = load_site_registry(registry_path, study=study)
    registered = verify_keys.get(site)
    if registered is None:
        raise ConfigError(
            f"site registry {registry_path} has no key for site {site!r}: use the "
            "startup kit provisioned for this site"
        )
    if key_id_for(registered) != key_id_for(signing_key.public_key()):
        raise ConfigError(
            f"site registry {registry_path} lists another key for site {site!r} "
            f"than the kit's {KitFiles.SIGNING_KEY}: the two files come from "
            "different provisionings"
        )
    return AdvertisementKeys(signing_key=signing_key, verify_keys=verify_keys)
