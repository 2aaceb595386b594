"""Provisioning: a study's certificate authority, keys and startup kits.

``provision`` creates, for one study:

- a certificate authority (ECDSA P-256) whose certificate every participant
  trusts and whose private key stays in the coordinator's kit;
- per site, a TLS client certificate with the site id as common name and as
  the URI ``medfed://site/<id>`` in its subject alternative names, and an
  Ed25519 key that signs the site's update envelopes and its masking key
  advertisements;
- the site registry of every site's Ed25519 public key, which the
  aggregation, coordinator and site kits contain; sites check the other
  sites' key advertisements against it;
- a TLS client certificate for the coordinator (URI ``medfed://coordinator``);
- a TLS server certificate for the aggregation service, valid for
  ``127.0.0.1``, ``localhost`` and the study config's
  ``aggregation.hostnames``, and an Ed25519 key with which the service signs
  its audit log's head;
- for a study with ``secure_aggregation: ckks``, one CKKS secret context
  that every site kit contains. The aggregation kit contains no CKKS
  material: the service builds a keyless context from the study's
  parameters.

Each participant gets one startup kit, a directory and a ``.tar.gz`` of it,
holding only what it needs: its own private keys, the CA certificate and
public material. No kit contains another participant's private key, except
the CKKS secret context, which all sites share and no other kit contains.
Private keys are written unencrypted with mode 0600, so the kits must travel
over a channel the consortium trusts.
"""

import hashlib
import ipaddress
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.contract.config import load_study_config
from medfed.contract.kits import (
    AGGREGATION_KIT,
    COORDINATOR_KIT,
    COORDINATOR_URI,
    KitFiles,
    site_kit_name,
    site_uri,
)
from medfed.contract.secagg.ckks import CkksParameters, CkksSiteContext
from medfed.contract.signing import public_key_to_base64, render_site_registry
from medfed.errors import ConfigError

__all__ = ["ProvisioningInputs", "provision", "read_provisioning_inputs"]

logger = logging.getLogger(__name__)

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


@dataclass(frozen=True)
class ProvisioningInputs:
    """The study id, site ids and service hostnames that provisioning uses."""

    study: str
    sites: tuple[str, ...]
    hostnames: tuple[str, ...] = ()
    #: The study's CKKS parameters when it uses ``secure_aggregation: ckks``.
    ckks: CkksParameters | None = None


def read_provisioning_inputs(study_config_path: Path) -> ProvisioningInputs:
    """Read the study id, site ids and service hostnames from a study config.

    Raises:
        ConfigError: the config fails the study config schema, or an
            ``aggregation.hostnames`` entry is not a DNS name or IP address.
    """
    config = load_study_config(study_config_path)
    hostnames = tuple(_validate_hostname(name) for name in config.aggregation.hostnames)
    secure = config.secure_aggregation
    return ProvisioningInputs(
        study=config.study,
        sites=tuple(site.id for site in config.sites),
        hostnames=hostnames,
        ckks=secure.ckks_parameters() if secure.mode == "ckks" else None,
    )


def provision(
    study_config_path: Path | str,
    out_dir: Path | str,
    *,
    validity_days: int = 365,
) -> dict[str, Path]:
    """Create the study CA, every key and certificate, and one kit per participant.

    Args:
        study_config_path: the study config YAML.
        out_dir: a new or empty directory that receives the kits.
        validity_days: how long certificates stay valid, in days (1 to 3650).

    Returns:
        The kit directory of each participant: ``coordinator``,
        ``aggregation`` and ``site-<id>`` per site. Each has a sibling
        ``<name>.tar.gz``.

    Raises:
        ConfigError: the config is invalid, ``out_dir`` is not empty, or
            ``validity_days`` is out of range.
    """
    if not isinstance(validity_days, int) or not 1 <= validity_days <= 3650:
        raise ConfigError(
            f"validity_days must be an integer from 1 to 3650, got {validity_days!r}"
        )
    inputs = read_provisioning_inputs(Path(study_config_path))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"output directory {out} is not empty: provisioning never overwrites "
            "keys, so choose a new directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    issuer = _CertificateIssuer(inputs.study, validity_days)

    registry_keys = {}
    site_material = {}
    for site in inputs.sites:
        signing_key = Ed25519PrivateKey.generate()
        registry_keys[site] = signing_key.public_key()
        site_material[site] = (issuer.issue_client(site_uri(site), site), signing_key)
    registry = render_site_registry(study=inputs.study, site_keys=registry_keys)
    audit_key = Ed25519PrivateKey.generate()
    service = issuer.issue_server(inputs.hostnames)
    coordinator = issuer.issue_client(COORDINATOR_URI, COORDINATOR_KIT)

    ckks_secret = None
    if inputs.ckks is not None:
        ckks_secret = CkksSiteContext.create(inputs.ckks).secret_bytes()

    kits: dict[str, Path] = {}
    for site, (tls, signing_key) in site_material.items():
        kit = _Kit(out / site_kit_name(site), issuer, role="site", name=site)
        kit.write_tls(tls)
        kit.write_private_key(KitFiles.SIGNING_KEY, signing_key)
        kit.write_public(KitFiles.SITE_REGISTRY, registry)
        if ckks_secret is not None:
            kit.write_secret(KitFiles.CKKS_SECRET_CONTEXT, ckks_secret)
        kits[site_kit_name(site)] = kit.close()

    kit = _Kit(out / AGGREGATION_KIT, issuer, role="aggregation", name=AGGREGATION_KIT)
    kit.write_tls(service)
    kit.write_private_key(KitFiles.AUDIT_SIGNING_KEY, audit_key)
    kit.write_public(KitFiles.SITE_REGISTRY, registry)
    kits[AGGREGATION_KIT] = kit.close()

    kit = _Kit(out / COORDINATOR_KIT, issuer, role="coordinator", name=COORDINATOR_KIT)
    kit.write_tls(coordinator)
    kit.write_private_key(KitFiles.CA_KEY, issuer.ca_key)
    kit.write_public(KitFiles.SITE_REGISTRY, registry)
    kit.write_public(
        KitFiles.AUDIT_PUBLIC_KEY,
        (public_key_to_base64(audit_key.public_key()) + "\n").encode(),
    )
    kits[COORDINATOR_KIT] = kit.close()

    logger.info(
        "provisioned study %s: %d site kits, coordinator and aggregation kits in %s",
        inputs.study,
        len(inputs.sites),
        out,
    )
    return kits


def _validate_hostname(name: Any) -> str:
    if isinstance(name, str):
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            if _HOSTNAME.fullmatch(name):
                return name
    raise ConfigError(
        f"invalid aggregation.hostnames entry {name!r}: use a lower-case DNS name "
        "or an IP address"
    )


@dataclass(frozen=True)
class _IssuedCertificate:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


class _CertificateIssuer:
    """The study CA: one key, one self-signed certificate, issuing leaf certificates."""

    def __init__(self, study: str, validity_days: int) -> None:
        self.study = study
        self.validity = timedelta(days=validity_days)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"medfed study {study}"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"medfed {study} CA"),
            ]
        )
        now = datetime.now(UTC)
        public_key = self.ca_key.public_key()
        self.ca_certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + self.validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                _key_usage(key_cert_sign=True, crl_sign=True, digital_signature=True),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )

    def issue_client(self, uri: str, common_name: str) -> _IssuedCertificate:
        return self._issue(
            common_name,
            [x509.UniformResourceIdentifier(uri)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )

    def issue_server(self, hostnames: Iterable[str]) -> _IssuedCertificate:
        names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]
        for hostname in hostnames:
            try:
                entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
            except ValueError:
                entry = x509.DNSName(hostname)
            if entry not in names:
                names.append(entry)
        return self._issue(AGGREGATION_KIT, names, ExtendedKeyUsageOID.SERVER_AUTH)

    def _issue(
        self,
        common_name: str,
        alternative_names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
    ) -> _IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.ORGANIZATION_NAME, f"medfed study {self.study}"
                ),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ca_key_id = x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + self.validity)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                _key_usage(digital_signature=True, key_agreement=True), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(alternative_names), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    ca_key_id
                ),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        return _IssuedCertificate(certificate=certificate, private_key=key)


class _Kit:
    """One participant's startup kit directory, with a manifest of its files."""

    def __init__(
        self, path: Path, issuer: _CertificateIssuer, *, role: str, name: str
    ) -> None:
        self.path = path
        self.role = role
        self.name = name
        self.study = issuer.study
        self.files: dict[str, str] = {}
        path.mkdir(mode=0o700)
        self.write_public(
            KitFiles.CA_CERT,
            issuer.ca_certificate.public_bytes(serialization.Encoding.PEM),
        )

    def write_tls(self, issued: _IssuedCertificate) -> None:
        self.write_public(
            KitFiles.TLS_CERT,
            issued.certificate.public_bytes(serialization.Encoding.PEM),
        )
        self.write_private_key(KitFiles.TLS_KEY, issued.private_key)

    def write_private_key(
        self, name: str, key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey
    ) -> None:
        pem = key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )
        self._write(name, pem, mode=0o600)

    def write_secret(self, name: str, data: bytes) -> None:
        self._write(name, data, mode=0o600)

    def write_public(self, name: str, data: bytes) -> None:
        self._write(name, data, mode=0o644)

    def close(self) -> Path:
        """Write the manifest and the kit's ``.tar.gz``; return the kit directory."""
        manifest = {
            "study": self.study,
            "role": self.role,
            "name": self.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": dict(sorted(self.files.items())),
        }
        self.write_public(
            KitFiles.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode()
        )
        archive = self.path.with_name(self.path.name + ".tar.gz")
        # The archive contains private keys, so it is created with mode 0600.
        descriptor = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with (
            os.fdopen(descriptor, "wb") as stream,
            tarfile.open(fileobj=stream, mode="w:gz") as tar,
        ):
            tar.add(self.path, arcname=self.path.name)
        return self.path

    def _write(self, name: str, data: bytes, *, mode: int) -> None:
        target = self.path / name
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        os.chmod(target, mode)
        if name != KitFiles.MANIFEST:
            self.files[name] = hashlib.sha256(data).hexdigest()


def _key_usage(
    *,
    digital_signature: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
