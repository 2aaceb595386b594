"""Provisioning: certificates, key modes and what each kit contains."""

import base64
import hashlib
import json
import re
import stat
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.contract.kits import KitFiles
from medfed.contract.signing import (
    SignatureVerifier,
    load_private_key,
    load_site_registry,
    public_key_to_base64,
)
from medfed.errors import ConfigError
from medfed.provision import provision

from .conftest import study_config_text

PRIVATE_FILES = {KitFiles.TLS_KEY, KitFiles.SIGNING_KEY, KitFiles.CA_KEY}


def _certificate(kit: Path, name: str = KitFiles.TLS_CERT) -> x509.Certificate:
    return x509.load_pem_x509_certificate((kit / name).read_bytes())


def _uris(certificate: x509.Certificate) -> list[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return names.value.get_values_for_type(x509.UniformResourceIdentifier)


def test_kits_named_per_participant(kits: dict[str, Path]) -> None:
    assert sorted(kits) == ["aggregation", "coordinator", "site-alpha", "site-beta"]
    for kit in kits.values():
        assert kit.with_name(kit.name + ".tar.gz").is_file()


def test_site_certificate_names_site(kits: dict[str, Path]) -> None:
    certificate = _certificate(kits["site-alpha"])
    common_names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [name.value for name in common_names] == ["alpha"]
    assert _uris(certificate) == ["medfed://site/alpha"]


def test_leaf_certificates_signed_by_ca(kits: dict[str, Path]) -> None:
    ca = _certificate(kits["coordinator"], KitFiles.CA_CERT)
    for kit in kits.values():
        certificate = _certificate(kit)
        certificate.verify_directly_issued_by(ca)


def test_service_certificate_alternative_names(kits: dict[str, Path]) -> None:
    certificate = _certificate(kits["aggregation"])
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    dns = names.value.get_values_for_type(x509.DNSName)
    addresses = [str(a) for a in names.value.get_values_for_type(x509.IPAddress)]
    assert dns == ["localhost", "aggregator.example.org"]
    assert addresses == ["127.0.0.1", "10.0.0.7"]


def test_private_keys_mode_0600(kits: dict[str, Path]) -> None:
    for kit in kits.values():
        for path in kit.iterdir():
            if path.name in PRIVATE_FILES or path.name == KitFiles.AUDIT_SIGNING_KEY:
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        archive = kit.with_name(kit.name + ".tar.gz")
        assert stat.S_IMODE(archive.stat().st_mode) == 0o600


def test_kit_contents_minimal(kits: dict[str, Path]) -> None:
    contents = {
        name: sorted(p.name for p in kit.iterdir()) for name, kit in kits.items()
    }
    assert contents["site-alpha"] == [
        "ca.crt",
        "manifest.json",
        "signing.key",
        "site-registry.json",
        "tls.crt",
        "tls.key",
    ]
    assert contents["aggregation"] == [
        "audit-signing.key",
        "ca.crt",
        "manifest.json",
        "site-registry.json",
        "tls.crt",
        "tls.key",
    ]
    assert contents["coordinator"] == [
        "audit-signing.pub",
        "ca.crt",
        "ca.key",
        "manifest.json",
        "site-registry.json",
        "tls.crt",
        "tls.key",
    ]


def test_ckks_secret_context_only_in_site_kits(tmp_path: Path) -> None:
    from medfed.contract.secagg.ckks import CkksParameters, CkksSiteContext

    config = tmp_path / "study.yaml"
    config.write_text(
        study_config_text(
            sites="[{id: alpha}, {id: beta}, {id: gamma}]",
            secure_aggregation="{mode: ckks, max_weight: 1000}",
        ),
        encoding="utf-8",
    )

    kits = provision(config, tmp_path / "out")

    name = KitFiles.CKKS_SECRET_CONTEXT
    secrets = [(kits[f"site-{site}"] / name) for site in ("alpha", "beta", "gamma")]
    assert len({path.read_bytes() for path in secrets}) == 1
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    context = CkksSiteContext.from_bytes(secrets[0].read_bytes(), CkksParameters())
    assert context.secret_bytes() == secrets[0].read_bytes()
    window = secrets[0].read_bytes()[4096 : 4096 + 64]
    for other in ("aggregation", "coordinator"):
        assert not (kits[other] / name).exists()
        with tarfile.open(kits[other].with_name(f"{other}.tar.gz")) as tar:
            archived = b"".join(
                extracted.read()
                for member in tar.getmembers()
                if (extracted := tar.extractfile(member)) is not None
            )
        files = b"".join(path.read_bytes() for path in kits[other].iterdir())
        assert window not in files + archived, other
    with tarfile.open(kits["site-beta"].with_name("site-beta.tar.gz")) as tar:
        assert f"site-beta/{name}" in tar.getnames()


def test_kits_without_ckks_hold_no_context(kits: dict[str, Path]) -> None:
    for kit in kits.values():
        assert not (kit / KitFiles.CKKS_SECRET_CONTEXT).exists()


def test_no_private_key_shared_between_kits(kits: dict[str, Path]) -> None:
    seen: dict[bytes, str] = {}
    for name, kit in kits.items():
        for path in kit.iterdir():
            if b"PRIVATE KEY" in path.read_bytes():
                assert path.read_bytes() not in seen, (name, path.name)
                seen[path.read_bytes()] = name
    assert len(seen) == 2 * 2 + 2 + 2  # two per site, aggregation, coordinator


def test_ca_key_matches_ca_certificate(kits: dict[str, Path]) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(
        (kits["coordinator"] / KitFiles.CA_KEY).read_bytes(), password=None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    ca = _certificate(kits["coordinator"], KitFiles.CA_CERT)
    assert key.public_key() == ca.public_key()


def test_registry_holds_site_public_keys(kits: dict[str, Path]) -> None:
    verifier = SignatureVerifier.from_registry(
        kits["aggregation"] / KitFiles.SITE_REGISTRY
    )
    assert verifier.sites == ["alpha", "beta"]
    load_private_key(kits["site-beta"] / KitFiles.SIGNING_KEY)


def test_site_kits_contain_registry(kits: dict[str, Path]) -> None:
    registry = (kits["aggregation"] / KitFiles.SITE_REGISTRY).read_bytes()
    for site in ("alpha", "beta"):
        kit = kits[f"site-{site}"]
        path = kit / KitFiles.SITE_REGISTRY
        manifest = json.loads((kit / KitFiles.MANIFEST).read_text())

        assert path.read_bytes() == registry, site
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, site
        assert manifest["files"][KitFiles.SITE_REGISTRY] == (
            hashlib.sha256(registry).hexdigest()
        ), site
        with tarfile.open(kit.with_name(kit.name + ".tar.gz")) as tar:
            extracted = tar.extractfile(f"{kit.name}/{KitFiles.SITE_REGISTRY}")
            assert extracted is not None
            assert extracted.read() == registry, site


def test_site_registry_contains_no_secret(kits: dict[str, Path]) -> None:
    registry = (kits["site-alpha"] / KitFiles.SITE_REGISTRY).read_text()
    document = json.loads(registry)
    beta_key = load_private_key(kits["site-beta"] / KitFiles.SIGNING_KEY)
    beta_private = base64.b64encode(
        beta_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    ).decode()

    assert sorted(document) == ["format", "sites", "study"]
    assert sorted(document["sites"]) == ["alpha", "beta"]
    for entry in document["sites"].values():
        assert sorted(entry) == ["key_id", "public_key"]
    assert "PRIVATE KEY" not in registry
    assert beta_private not in registry
    assert document["sites"]["beta"]["public_key"] == public_key_to_base64(
        beta_key.public_key()
    )
    assert load_site_registry(
        kits["site-alpha"] / KitFiles.SITE_REGISTRY, study="heart"
    ).keys() == {"alpha", "beta"}


def test_archive_matches_directory(kits: dict[str, Path]) -> None:
    kit = kits["site-beta"]
    with tarfile.open(kit.with_name(kit.name + ".tar.gz")) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        assert sorted(members) == sorted(f"site-beta/{p.name}" for p in kit.iterdir())
        assert members["site-beta/tls.key"].mode == 0o600
        extracted = tar.extractfile("site-beta/tls.key")
        assert extracted is not None
        assert extracted.read() == (kit / "tls.key").read_bytes()


def test_nonempty_output_rejected(study_config: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(
        ConfigError, match="is not empty: provisioning never overwrites"
    ):
        provision(study_config, tmp_path)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            study_config_text(sites="[{id: alpha}, {id: ../x}]"),
            "sites.1.id: String should match pattern",
        ),
        (study_config_text(study="/etc"), "study: String should match pattern"),
        (
            study_config_text(sites="[{id: alpha}, {id: alpha}]"),
            "site ids must be unique; repeated: alpha",
        ),
        (study_config_text(sites="[]"), "sites: List should have at least 1 item"),
        (
            study_config_text(aggregation="{hostnames: ['a b']}"),
            "invalid aggregation.hostnames entry 'a b'",
        ),
        (
            study_config_text(aggregation="{hostname: x}"),
            "unknown key 'aggregation.hostname'",
        ),
    ],
)
def test_invalid_config_rejected(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(config, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)):
        provision(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_validity_days_checked(study_config: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="validity_days must be an integer from 1"):
        provision(study_config, tmp_path / "out", validity_days=0)


def test_cli_provision_writes_audit(study_config: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from medfed.aggregation.audit import verify
    from medfed.security_cli import PROVISIONING_AUDIT_LOG, provision_command

    app = typer.Typer()
    app.command()(provision_command)
    out = tmp_path / "kits"
    result = CliRunner().invoke(app, [str(study_config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"site-alpha: {out / 'site-alpha'}" in result.output
    log = out / PROVISIONING_AUDIT_LOG
    assert verify(log).ok
    entry = json.loads(log.read_text())
    assert entry["event"] == "study.provisioned"
    assert entry["details"]["sites"] == ["alpha", "beta"]
    again = CliRunner().invoke(app, [str(study_config), "--out", str(out)])
    assert again.exit_code == ConfigError.exit_code
    assert "is not empty: provisioning never overwrites" in again.output


def test_shipped_config_provisions(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "heart_disease.yaml"
    kits = provision(config, tmp_path / "kits")
    assert sorted(kits) == [
        "aggregation",
        "coordinator",
        "site-cleveland",
        "site-hungary",
        "site-long-beach",
        "site-switzerland",
    ]


def test_config_limits_match_service_defaults() -> None:
    from medfed.aggregation.limits import ServiceLimits
    from medfed.contract.config import AggregationConfig

    config = AggregationConfig()
    limits = ServiceLimits()
    assert config.rate_per_second == limits.rate_per_second
    assert config.rate_burst == limits.rate_burst
    assert config.max_concurrency == limits.max_concurrency
