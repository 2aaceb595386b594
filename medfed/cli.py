"""The ``medfed`` command line.

Errors that medfed raises on purpose (``MedfedError``) print one line and exit
with the error's code: 2 config, 3 data, 4 envelope, 5 privacy budget,
6 aggregation service, 7 aggregation, 8 quorum.
"""

import json
import logging
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from medfed.errors import MedfedError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Federated learning across hospitals under DP.",
)
console = Console()
errors = Console(stderr=True)


@app.command()
def run(
    config_path: Annotated[
        Path, typer.Argument(metavar="CONFIG", help="study config (YAML)")
    ],
    summary_json: Annotated[
        Path | None,
        typer.Option(
            "--summary-json", help="write the study summary to this JSON file"
        ),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="folder for site and service state; default .medfed/runs/STUDY-TIMESTAMP",
        ),
    ] = None,
) -> None:
    """Run a study in local mode and print per-site and pooled results."""
    from medfed.contract.config import load_study_config

    config = load_study_config(config_path)
    config_text = config_path.read_text(encoding="utf-8")
    if work_dir is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        work_dir = Path(".medfed") / "runs" / f"{config.study}-{stamp}"
    work_dir.mkdir(parents=True, exist_ok=True)

    from medfed.flows.training import run_study

    started = time.monotonic()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task(
            f"{config.study}: rounds", total=config.training.rounds, metrics=""
        )

        def on_round(round_number: int, summary: dict[str, Any]) -> None:
            progress.update(
                bar,
                completed=round_number + 1,
                metrics=f"pooled acc {summary['pooled_test_accuracy']:.3f} "
                f"auc {summary['pooled_test_auc']:.3f}",
            )

        summary = run_study(config, config_text, work_dir=work_dir, listener=on_round)
    summary["wall_seconds"] = time.monotonic() - started
    summary["work_dir"] = str(work_dir)
    _print_summary(summary)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(
            json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8"
        )


@app.command("serve-aggregator")
def serve_aggregator(
    state_dir: Annotated[
        Path, typer.Option("--state-dir", help="folder for the service's SQLite state")
    ],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on")] = 8765,
    max_upload_bytes: Annotated[
        int, typer.Option(help="largest request body accepted, in bytes")
    ] = 64 * 1024 * 1024,
) -> None:
    """Run the aggregation service."""
    import uvicorn

    from medfed.aggregation.service import ServiceSettings, create_app

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    application = create_app(
        ServiceSettings(state_dir=state_dir, max_upload_bytes=max_upload_bytes)
    )
    uvicorn.run(application, host=host, port=port, log_level="warning")


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"Study {summary['study']}: {summary['rounds']} rounds")
    for column in (
        "site",
        "train records",
        "test accuracy",
        "test AUC",
        "epsilon spent",
    ):
        table.add_column(column, justify="right" if column != "site" else "left")
    for site, values in summary["sites"].items():
        table.add_row(
            site,
            str(values["train_records"]),
            _number(values["test_accuracy"]),
            _number(values["test_auc"]),
            _number(values["epsilon_spent"]),
        )
    table.add_row(
        "[bold]pooled",
        str(sum(v["train_records"] for v in summary["sites"].values())),
        _number(summary["pooled_test_accuracy"]),
        _number(summary["pooled_test_auc"]),
        "",
    )
    console.print(table)
    console.print(
        f"wall time {summary['wall_seconds']:.1f} s; model version {summary['model_version']} "
        f"registered as MLflow model version {summary['registered_model_version']}; "
        f"state in {summary['work_dir']}"
    )
    for refusal in summary["refusals"]:
        console.print(f"[yellow]round {refusal['round']}: {refusal['message']}")


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def configure_prefect_environment() -> None:
    """Set quiet, offline-friendly Prefect defaults unless the user set them."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # Hospitals and CI machines may have no route to Prefect's telemetry host.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API starts a server subprocess; on a loaded 2-core
    # machine it can take longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main() -> None:
    """Entry point of the ``medfed`` console command."""
    configure_prefect_environment()
    try:
        app(standalone_mode=False)
    except MedfedError as error:
        errors.print(f"medfed: error: {error}", markup=False, highlight=False)
        sys.exit(error.exit_code)
    except (typer.Exit, typer.Abort) as stop:
        sys.exit(getattr(stop, "exit_code", 1))
    except (
        Exception
    ) as error:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
