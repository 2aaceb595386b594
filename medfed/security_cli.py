"""CLI commands for provisioning and the audit log.

``medfed.cli`` registers them: ``provision_command`` as ``medfed provision``
and ``audit_app`` as the ``medfed audit`` group.
"""

import json
from pathlib import Path
from typing import Annotated

import typer

from medfed.aggregation.audit import AuditLog, verify
from medfed.contract.signing import public_key_from_base64
from medfed.errors import AuditLogError, MedfedError
from medfed.provision import provision, read_provisioning_inputs

__all__ = ["audit_app", "provision_command"]

audit_app = typer.Typer(help="Inspect the aggregation service's audit log.")

PROVISIONING_AUDIT_LOG = "provisioning-audit.jsonl"


@audit_app.callback()
def audit_group() -> None:
    """Inspect the aggregation service's audit log."""


def provision_command(
    study_config: Annotated[Path, typer.Argument(help="The study config YAML.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Empty directory for the kits.", show_default="kits/<study>"),
    ] = None,
    validity_days: Annotated[
        int, typer.Option(help="Certificate lifetime, in days.")
    ] = 365,
) -> None:
    """Create the study CA, keys and certificates, and one startup kit each."""
    try:
        inputs = read_provisioning_inputs(study_config)
        out_dir = out if out is not None else Path("kits") / inputs.study
        kits = provision(study_config, out_dir, validity_days=validity_days)
        with AuditLog(out_dir / PROVISIONING_AUDIT_LOG) as log:
            log.append(
                "study.provisioned",
                "coordinator",
                {
                    "study": inputs.study,
                    "sites": list(inputs.sites),
                    "kits": sorted(kits),
                    "validity_days": validity_days,
                },
            )
    except MedfedError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_code) from None
    for name, path in kits.items():
        typer.echo(f"{name}: {path} ({path.name}.tar.gz)")
    typer.echo(
        "Send each kit to its participant over a trusted channel: kits contain "
        "unencrypted private keys."
    )


@audit_app.command("verify")
def verify_command(
    log: Annotated[Path, typer.Argument(help="The audit log (JSON lines).")],
    signed_head: Annotated[
        Path | None,
        typer.Option(help="A signed head JSON written by the service."),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(help="The service's audit-signing.pub (base64 Ed25519)."),
    ] = None,
) -> None:
    """Check the audit log's hash chain and, optionally, a signed head.

    Exits 0 when the log verifies; otherwise prints the first broken entry
    and the reason and exits with the audit error code.
    """
    try:
        head_document = None
        key = None
        if public_key is not None and signed_head is None:
            # Without a head there is nothing to check the key against, and
            # "ok" would read as if a signature had been verified.
            raise AuditLogError(
                "--public-key requires --signed-head: pass the service's "
                "audit.jsonl.head.json, or leave out --public-key to check "
                "only the hash chain"
            )
        if signed_head is not None:
            if public_key is None:
                raise AuditLogError(
                    "--signed-head requires --public-key: pass the "
                    "audit-signing.pub of the study's coordinator kit"
                )
            head_document = json.loads(signed_head.read_text(encoding="utf-8"))
            key = public_key_from_base64(public_key.read_text(encoding="ascii").strip())
        result = verify(log, signed_head=head_document, public_key=key)
    except (MedfedError, OSError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        code = error.exit_code if isinstance(error, MedfedError) else 1
        raise typer.Exit(code) from None
    if not result.ok:
        where = f"entry {result.broken_at}" if result.broken_at else "signed head"
        typer.echo(f"audit log {log} is broken at {where}: {result.reason}", err=True)
        raise typer.Exit(AuditLogError.exit_code)
    typer.echo(f"audit log {log}: {result.entries} entries, head {result.head}, ok")
