"""Fixtures of the containers tier: a podman engine, the images, a deployment.

The session runs ``scripts/containers/setup.sh`` once (install podman, make
the base image, start the Docker Engine API service) and
``scripts/containers/teardown.sh`` at the end. A failed setup fails every
test of the tier with setup's own output; nothing here skips.

Everything runs on this machine: the containers use the host network and
every service binds 127.0.0.1 on a free port. The deployment runs with the
startup kits of ``medfed provision``, so the aggregation service requires
mutual TLS and signed updates as at a consortium.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medfed.contract.kits import AGGREGATION_KIT, site_kit_name
from medfed.deploy import (
    IMAGE_USER_ID,
    REPOSITORY_ROOT,
    DeploymentSettings,
    RunningDeployment,
    ServicePorts,
    build_images,
    connect,
    deploy_down,
    deploy_up,
    prepare_build_context,
)
from medfed.provision import provision
from medfed.sites.data.root import resolve_data_root

from .support import HEART_SITES, TIMINGS, write_study_config

SCRIPTS = REPOSITORY_ROOT / "scripts" / "containers"
ENGINE_STATE = REPOSITORY_ROOT / ".podman"
BASE_IMAGE = "localhost/medfed-base:bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TIMINGS_FILE = ENGINE_STATE / "tier-timings.json"


@pytest.fixture(scope="session")
def engine() -> Iterator[Any]:
    """Run setup.sh, point this process at its engine, yield a Docker client."""
    started = time.monotonic()
    setup = subprocess.run(
        [str(SCRIPTS / "setup.sh")], capture_output=True, text=True, check=False
    )
    if setup.returncode != 0:
        pytest.fail(
            f"scripts/containers/setup.sh failed with status {setup.returncode}:\n"
            f"{setup.stderr[-3000:]}",
            pytrace=False,
        )
    for line in (ENGINE_STATE / "env").read_text(encoding="utf-8").splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        os.environ[key] = value.strip('"')
    TIMINGS["setup_seconds"] = time.monotonic() - started
    TIMINGS["setup_steps"] = json.loads(
        (ENGINE_STATE / "setup-timings.json").read_text(encoding="utf-8")
    )
    client = connect()
    try:
        yield client
    finally:
        client.close()
        teardown = subprocess.run(
            [str(SCRIPTS / "teardown.sh")], capture_output=True, text=True, check=False
        )
        TIMINGS["teardown_status"] = teardown.returncode
        _write_timings()


@pytest.fixture(scope="session")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Provision the four heart-disease sites; return the kits folder.

    The service's and the sites' kits are handed to uid 10001, the images'
    user, as a consortium would before mounting them.
    """
    folder = tmp_path_factory.mktemp("kits")
    config_path = write_study_config(folder, "heart-deploy")
    kits_dir = folder / "kits"
    provision(config_path, kits_dir)
    for name in [AGGREGATION_KIT, *(site_kit_name(site) for site in HEART_SITES)]:
        for path in [kits_dir / name, *(kits_dir / name).rglob("*")]:
            os.chown(path, IMAGE_USER_ID, IMAGE_USER_ID)
    return kits_dir


@pytest.fixture(scope="session")
def settings(kits: Path) -> DeploymentSettings:
    """Settings with free loopback ports and a deployment name of this run."""
    return DeploymentSettings(
        name=f"medfed-test-{os.getpid()}",
        ports=ServicePorts(
            prefect=_free_port(), mlflow=_free_port(), aggregation=_free_port()
        ),
        base_image=BASE_IMAGE,
        worker_poll_seconds=1.0,
        kits_dir=kits,
    )


@pytest.fixture(scope="session")
def images(engine: Any, settings: DeploymentSettings) -> dict[str, float]:
    """Build the three images through the Docker Engine API."""
    started = time.monotonic()
    prepare_build_context(
        REPOSITORY_ROOT,
        ca_bundle=HOST_CA_BUNDLE if HOST_CA_BUNDLE.is_file() else None,
        torch_wheel=_local_torch_wheel(),
    )
    seconds = build_images(engine, settings)
    TIMINGS["build_seconds"] = {**seconds, "total": time.monotonic() - started}
    return seconds


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Return the data root as sites resolve it; fail when a file is missing."""
    root = resolve_data_root()
    missing = [
        name
        for name in HEART_SITES.values()
        if not (root / "heart-disease" / name).is_file()
    ]
    if missing:
        pytest.fail(
            f"heart-disease files {', '.join(missing)} not found under {root}; set "
            "MEDFED_DATA_DIR to the folder that contains heart-disease/",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def deployment(
    engine: Any,
    images: dict[str, float],
    settings: DeploymentSettings,
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningDeployment]:
    """The coordinator side and four heart-disease site containers."""
    config_path = write_study_config(tmp_path_factory.mktemp("deploy"), "heart-deploy")
    started = time.monotonic()
    try:
        running = deploy_up(
            config_path,
            settings=settings,
            data_root=data_root,
            build=False,
            client=engine,
        )
    except BaseException:
        deploy_down(name=settings.name, remove_volumes=True, client=engine)
        raise
    TIMINGS["deploy_up_seconds"] = time.monotonic() - started
    try:
        yield running
    finally:
        _save_container_logs(engine, settings.name)
        deploy_down(name=settings.name, remove_volumes=True, client=engine)


def _local_torch_wheel() -> Path | None:
    """Return this machine's CPU torch wheel from pip's local sources, if any.

    ``--no-index`` keeps pip to its configured find-links, so this never
    downloads the large default torch build.
    """
    folder = REPOSITORY_ROOT / "build" / "torch-wheel"
    shutil.rmtree(folder, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "torch==2.13.0", "--no-deps",
         "--no-index", "--quiet", "-d", str(folder)],
        capture_output=True,
        check=False,
    )  # fmt: skip
    wheels = sorted(folder.glob("torch-*.whl"))
    return wheels[0] if result.returncode == 0 and wheels else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _save_container_logs(client: Any, name: str) -> None:
    """Keep each container's log under .podman/logs for failure analysis."""
    folder = ENGINE_STATE / "logs" / name
    folder.mkdir(parents=True, exist_ok=True)
    for container in client.containers.list(
        all=True, filters={"label": f"io.medfed.deployment={name}"}
    ):
        (folder / f"{container.name}.log").write_bytes(container.logs())


def _write_timings() -> None:
    TIMINGS_FILE.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS_FILE.write_text(
        json.dumps(TIMINGS, indent=2, sort_keys=True), encoding="utf-8"
    )
