"""The ``medfed`` command line.

Errors that medfed raises on purpose (``MedfedError``) print one line and exit
with the error's code: 2 config, 3 data, 4 envelope, 5 privacy budget,
6 aggregation service, 7 aggregation, 8 quorum, 9 audit log, 10 secure
aggregation, 11 deployment, 12 site run in deployment mode.
"""

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
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

from medfed.errors import ConfigError, MedfedError, ServiceError
from medfed.security_cli import audit_app, provision_command

__all__ = ["app", "main"]

app = typer.Typer(
    pretty_exceptions_show_locals=False,
    add_completion=False,
    no_args_is_help=True,
    help="Federated learning across hospitals under DP.",
)
console = Console()
logger = logging.getLogger(__name__)


@app.callback()
def configure(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="log progress at INFO level")
    ] = False,
) -> None:
    """Federated learning across hospitals under differential privacy."""
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        # Library hints a study lead cannot act on: Opacus' note on the RDP
        # order range (the PRV accountant's bound stays valid), numpy's
        # divide-by-zero inside the PRV accountant (np.where evaluates both
        # branches and keeps the finite one) and MLflow's suggestion to
        # type-annotate the model-from-code's predict method.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings(
            "ignore",
            category=RuntimeWarning,
            module=r"opacus\.accountants\.analysis\.prv",
        )
        warnings.filterwarnings(
            "ignore", message=".*type hints to the `predict` method"
        )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("mlflow").setLevel(level)
    logging.getLogger("alembic").setLevel(level)
    if verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"


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
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue the study in --work-dir (default: its latest run folder) "
            "from its last finished round",
        ),
    ] = False,
    deployed_sites: Annotated[
        bool,
        typer.Option(
            "--deployed-sites",
            help="run each site's work in its Prefect work pool site-<id> (started "
            "by 'medfed deploy') instead of in this process; needs PREFECT_API_URL "
            "and aggregation.url",
        ),
    ] = False,
    kit_dir: Annotated[
        Path | None,
        typer.Option(
            "--kit-dir",
            help="the coordinator's startup kit from medfed provision; the flow "
            "then calls the aggregation.url service over mutual TLS",
        ),
    ] = None,
) -> None:
    """Run a study and print per-site and pooled results.

    Sites run in this process unless ``--deployed-sites`` is given.
    """
    from medfed.contract.config import load_study_config

    config = load_study_config(config_path)
    config_text = config_path.read_text(encoding="utf-8")
    if deployed_sites and not config.aggregation.url:
        raise ConfigError(
            "--deployed-sites needs aggregation.url in the study config: the URL "
            "at which the sites reach the aggregation service"
        )
    if kit_dir is not None and not config.aggregation.url:
        raise ConfigError(
            "--kit-dir needs aggregation.url in the study config: the kit "
            "authenticates the coordinator to that service"
        )
    runs = Path(".medfed") / "runs"
    if work_dir is None and resume:
        previous = sorted(runs.glob(f"{config.study}-*"))
        if not previous:
            raise ConfigError(
                f"no earlier run of study {config.study!r} under {runs}; pass --work-dir"
            )
        work_dir = previous[-1]
    elif work_dir is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        work_dir = runs / f"{config.study}-{stamp}"
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(
            f"--work-dir {work_dir} is a file; pass a folder for the study's state"
        )
    if resume and not (work_dir / "coordinator.json").exists():
        raise ConfigError(
            f"no earlier run of study {config.study!r} in {work_dir}; pass the "
            "--work-dir of that run, or leave out --resume to start a new one"
        )

    from medfed.flows.training import run_study
    from medfed.reaper import start_reaper

    _exit_on_signals()
    # Kept for the life of the process: the watchdog stops this command's
    # children if it is killed without a chance to stop them itself.
    _watchdogs.append(start_reaper())
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
        steps = "versions" if config.round.asynchronous is not None else "rounds"
        bar = progress.add_task(
            f"{config.study}: {steps}", total=config.training.rounds, metrics=""
        )

        def on_round(round_number: int, summary: dict[str, Any]) -> None:
            if "pooled_test_accuracy" not in summary:
                # An asynchronous version: sites evaluate only the final one.
                progress.update(bar, completed=round_number + 1)
                return
            progress.update(
                bar,
                completed=round_number + 1,
                metrics=f"pooled acc {summary['pooled_test_accuracy']:.3f} "
                f"auc {summary['pooled_test_auc']:.3f}",
            )

        try:
            summary = run_study(
                config,
                config_text,
                work_dir=work_dir,
                listener=on_round,
                resume=resume,
                deployed_sites=deployed_sites,
                kit_dir=kit_dir,
            )
        except ServiceError as error:
            if not (work_dir / "coordinator.json").exists():
                raise
            raise ServiceError(
                f"{error}; the study's state is kept in {work_dir}, so once the "
                f"cause is fixed continue with: medfed run {config_path} --resume "
                f"--work-dir {work_dir}"
            ) from None
        except SystemExit:
            # Ctrl-C or SIGTERM (see _exit_on_signals), after run_study
            # stopped its services.
            if (work_dir / "coordinator.json").exists():
                typer.echo(
                    f"medfed: stopped; continue the study with: medfed run "
                    f"{config_path} --resume --work-dir {work_dir}",
                    err=True,
                )
            raise
    summary["wall_seconds"] = time.monotonic() - started
    summary["work_dir"] = str(work_dir)
    _print_summary(summary)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        # JSON has no NaN: an AUC over one class is written as null.
        summary_json.write_text(
            json.dumps(_without_nan(summary), indent=2, sort_keys=True),
            encoding="utf-8",
        )


_watchdogs: list[Any] = []


def _exit_on_signals() -> None:
    """Make SIGTERM and Ctrl-C exit through the study's cleanup, within a bound.

    The handler raises SystemExit, so ``run_study`` stops the services it
    started. The exception lands wherever the main thread is at that moment,
    and a cleanup interrupted there can hang. So a timer ends the process after
    ``SHUTDOWN_GRACE_SECONDS``, and the watchdog then stops the children.
    """

    def handle(number: int, frame: FrameType | None) -> None:
        # A second signal during the cleanup ends the process at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        deadline = threading.Timer(
            SHUTDOWN_GRACE_SECONDS, os._exit, args=(128 + number,)
        )
        deadline.daemon = True
        deadline.start()
        raise SystemExit(128 + number)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


#: Seconds that ``medfed run`` gets to stop its services after SIGTERM or
#: Ctrl-C before it exits without finishing the cleanup.
SHUTDOWN_GRACE_SECONDS = 30.0


def _without_nan(value: Any) -> Any:
    """Return ``value`` with every float NaN replaced by None, recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


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
    kit_dir: Annotated[
        Path | None,
        typer.Option(
            "--kit-dir",
            help="the service's startup kit from medfed provision; enables mutual "
            "TLS, signature checks and a signed audit head",
        ),
    ] = None,
    rate_per_second: Annotated[
        float, typer.Option(help="sustained requests per second allowed per site")
    ] = 20.0,
    rate_burst: Annotated[
        int, typer.Option(help="requests a site may send at once after being idle")
    ] = 50,
    max_concurrency: Annotated[
        int, typer.Option(help="concurrent connections and tasks before a 503")
    ] = 256,
) -> None:
    """Run the aggregation service."""
    import uvicorn

    from medfed.aggregation.limits import ServiceLimits
    from medfed.aggregation.service import ServiceSettings, create_app

    # The service logs its round events (studies created, uploads accepted or
    # rejected, rounds finalized) at INFO. The --verbose callback has already
    # configured the root logger, at WARNING without the flag, so basicConfig
    # here would change nothing.
    logging.getLogger().setLevel(logging.INFO)
    limits = ServiceLimits(
        rate_per_second=rate_per_second,
        rate_burst=rate_burst,
        max_concurrency=max_concurrency,
    )
    application = create_app(
        ServiceSettings(
            state_dir=state_dir,
            max_upload_bytes=max_upload_bytes,
            kit_dir=kit_dir,
            service_limits=limits,
        )
    )
    scheme = "http" if kit_dir is None else "https"
    logger.info(
        "starting the aggregation service on %s://%s:%d with state in %s",
        scheme,
        host,
        port,
        state_dir,
    )
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level="warning",
        **application.state.security.uvicorn_options(),
    )


app.command("provision")(provision_command)
app.add_typer(audit_app, name="audit")


@app.command()
def deploy(
    config_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="CONFIG", help="study config (YAML); its sites get containers"
        ),
    ] = None,
    down: Annotated[
        bool,
        typer.Option("--down", help="stop and remove the deployment's containers"),
    ] = False,
    name: Annotated[
        str, typer.Option(help="deployment name, put on every container as a label")
    ] = "medfed",
    host: Annotated[
        str, typer.Option(help="address the coordinator-side services bind to")
    ] = "127.0.0.1",
    prefect_port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port")] = 5000,
    aggregation_port: Annotated[
        int, typer.Option(help="aggregation service port")
    ] = 8600,
    base_image: Annotated[
        str | None,
        typer.Option(help="BASE_IMAGE of the Dockerfiles; default python:3.11-slim"),
    ] = None,
    build: Annotated[
        bool, typer.Option(help="build the images first; --no-build reuses them")
    ] = True,
    ca_bundle: Annotated[
        Path | None, typer.Option(help="extra CA bundle that pip trusts in builds")
    ] = None,
    torch_wheel: Annotated[
        Path | None, typer.Option(help="local torch wheel to install in the images")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="data root on this machine; default as the sites resolve it "
            "(data.root, MEDFED_DATA_DIR, ../shared/data)"
        ),
    ] = None,
    keys_dir: Annotated[
        Path | None,
        typer.Option(
            help="folder with one keys folder per site id (site-<id> or <id>), "
            "mounted read-only; default --kits-dir"
        ),
    ] = None,
    kits_dir: Annotated[
        Path | None,
        typer.Option(
            help="folder that medfed provision wrote; the aggregation service "
            "then requires mutual TLS with its kit and each site mounts its kit"
        ),
    ] = None,
    remove_volumes: Annotated[
        bool,
        typer.Option(
            "--remove-volumes",
            help="with --down, also delete the state volumes (privacy ledgers, "
            "Prefect and MLflow databases)",
        ),
    ] = False,
) -> None:
    """Start the coordinator side and one container per site, or remove them.

    Uses the container engine that DOCKER_HOST names (Docker or podman's API
    service). Every container gets the label io.medfed.deployment=NAME, and
    --down removes exactly those.
    """
    from medfed.deploy import DeploymentSettings, ServicePorts, deploy_down, deploy_up

    if down:
        removed = deploy_down(name=name, remove_volumes=remove_volumes)
        console.print(f"removed {len(removed)} containers and volumes of {name}")
        return
    if config_path is None:
        raise ConfigError("medfed deploy needs a study config; pass CONFIG or --down")
    settings = DeploymentSettings(
        name=name,
        host=host,
        ports=ServicePorts(
            prefect=prefect_port, mlflow=mlflow_port, aggregation=aggregation_port
        ),
        base_image=base_image,
        kits_dir=kits_dir,
    )
    running = deploy_up(
        config_path,
        settings=settings,
        data_root=data_dir,
        keys_root=keys_dir,
        build=build,
        ca_bundle=ca_bundle,
        torch_wheel=torch_wheel,
    )
    console.print(f"Prefect API        {running.prefect_api_url}")
    console.print(f"MLflow             {running.mlflow_url}")
    console.print(f"aggregation        {running.aggregation_url}")
    for site, pool in running.deployments.items():
        console.print(f"site {site:<13} work pool {pool}")


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
            "-" if values["train_records"] is None else str(values["train_records"]),
            _number(values["test_accuracy"]),
            _number(values["test_auc"]),
            _number(values["epsilon_spent"]),
        )
    table.add_row(
        "[bold]pooled",
        # A site that could not prepare its data has no record count.
        str(sum(v["train_records"] or 0 for v in summary["sites"].values())),
        _number(summary["pooled_test_accuracy"]),
        _number(summary["pooled_test_auc"]),
        "",
    )
    console.print(table)
    console.print(
        f"wall time {summary['wall_seconds']:.1f} s; global model version "
        f"{summary['model_version']} of the aggregation service registered as "
        f"MLflow model version {summary['registered_model_version']}; "
        f"state in {summary['work_dir']}"
    )
    for refusal in summary["refusals"]:
        console.print(f"[yellow]round {refusal['round']}: {refusal['message']}")


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def configure_environment() -> None:
    """Set quiet, offline-friendly Prefect and MLflow defaults unless set."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Prefect logs every failed task with its traceback; the CLI reports
    # errors as one line instead. ``medfed --verbose`` restores the logs.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    # Hospitals and CI machines may have no route to Prefect's telemetry host.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API starts a server subprocess; on a loaded 2-core
    # machine it can take longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main() -> None:
    """Entry point of the ``medfed`` console command."""
    configure_environment()
    try:
        app()
    except MedfedError as error:
        # A plain print: a rich console would wrap the line at terminal width.
        print(f"medfed: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


# ``python -m medfed.cli`` would otherwise import the commands and exit 0
# without running any of them.
if __name__ == "__main__":
    main()
