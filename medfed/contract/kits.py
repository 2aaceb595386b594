"""Startup kit layout and the TLS identities it carries.

``medfed.provision`` writes one kit per participant; sites, the coordinator
and the aggregation service read their own kit through the names here. A
client certificate names its holder by one URI in its subject alternative
names: ``medfed://site/<id>`` for a site, ``medfed://coordinator`` for the
coordinator. The common name repeats the site id (or ``coordinator``).
"""

import ssl
from pathlib import Path

from medfed.contract.ids import validate_identifier

__all__ = [
    "AGGREGATION_KIT",
    "COORDINATOR_KIT",
    "COORDINATOR_URI",
    "SITE_URI_PREFIX",
    "KitFiles",
    "client_ssl_context",
    "site_kit_name",
    "site_uri",
]

COORDINATOR_KIT = "coordinator"
AGGREGATION_KIT = "aggregation"
SITE_URI_PREFIX = "medfed://site/"
COORDINATOR_URI = "medfed://coordinator"


class KitFiles:
    """File names inside a startup kit."""

    CA_CERT = "ca.crt"
    CA_KEY = "ca.key"
    TLS_CERT = "tls.crt"
    TLS_KEY = "tls.key"
    SIGNING_KEY = "signing.key"
    AUDIT_SIGNING_KEY = "audit-signing.key"
    AUDIT_PUBLIC_KEY = "audit-signing.pub"
    SITE_REGISTRY = "site-registry.json"
    MANIFEST = "manifest.json"
    #: A site's CKKS context with the study's secret key; only site kits
    #: contain it, and only for studies with ``secure_aggregation: ckks``.
    CKKS_SECRET_CONTEXT = "ckks-secret-context.bin"


def site_uri(site: str) -> str:
    return SITE_URI_PREFIX + validate_identifier(site, kind="site")


def site_kit_name(site: str) -> str:
    return f"site-{validate_identifier(site, kind='site')}"


def client_ssl_context(kit_dir: Path) -> ssl.SSLContext:
    """Build a TLS client context from a site's or the coordinator's kit.

    The context trusts only the study CA and presents the kit's client
    certificate, so it reaches the aggregation service and nothing else.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(kit_dir / KitFiles.CA_CERT)
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(
        certfile=str(kit_dir / KitFiles.TLS_CERT),
        keyfile=str(kit_dir / KitFiles.TLS_KEY),
    )
    return context
