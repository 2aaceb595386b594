"""Start and stop medfed's containers through the Docker Engine API.

``deploy_up`` builds the three images from this repository (site, aggregation
service, coordinator), starts the coordinator side (Prefect server, MLflow
tracking server, aggregation service), starts one site container per study
site and registers each site's work pool and ``site_round`` deployment.
``deploy_down`` stops and removes what ``deploy_up`` started.

With the startup kits from ``medfed provision`` (``DeploymentSettings.kits_dir``)
the aggregation service runs with its kit: it serves HTTPS, requires client
certificates from the study CA and checks every update's signature. Each
site container then mounts its own kit, and the coordinator's flow must
connect with the coordinator kit (``medfed run --kit-dir``).

Every container and volume created here carries the label
``io.medfed.deployment=<name>``, and ``deploy_down`` selects by that label
only, so it never touches other containers on the same engine. Volumes hold
state that must outlive a container (a site's privacy ledger, the Prefect and
MLflow databases, the aggregation rounds) and are kept unless removal is
requested.

Any engine that serves the Docker Engine API works: Docker, or podman's
``podman system service`` named by ``DOCKER_HOST``.
"""

import logging
import os
import shutil
import ssl
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from medfed.contract.config import StudyConfig, load_study_config
from medfed.contract.kits import AGGREGATION_KIT, KitFiles, site_kit_name
from medfed.errors import ConfigError, DeployError
from medfed.sites.data.root import resolve_data_root

__all__ = [
    "IMAGE_ROLES",
    "LABEL_DEPLOYMENT",
    "LABEL_ROLE",
    "LABEL_SITE",
    "DeploymentSettings",
    "RunningDeployment",
    "ServicePorts",
    "SiteContainerSpec",
    "build_images",
    "connect",
    "deploy_down",
    "deploy_up",
    "prepare_build_context",
    "require_readable_kit",
    "site_container_specs",
    "start_coordinator",
    "start_site",
]

logger = logging.getLogger(__name__)

LABEL_DEPLOYMENT = "io.medfed.deployment"
LABEL_ROLE = "io.medfed.role"
LABEL_SITE = "io.medfed.site"

#: Image roles; each has ``images/<role>.Dockerfile``.
IMAGE_ROLES = ("site", "aggregation", "coordinator")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = Path("images") / "build-inputs"

#: Mount points in the site image (site.Dockerfile sets the same paths as env).
SITE_DATA_DIR = "/data"
SITE_KEYS_DIR = "/run/secrets/medfed"
STATE_DIR = "/state"

#: User and group id of the ``medfed`` user in every image; mounted kits must
#: be readable by it.
IMAGE_USER_ID = 10001

#: Folder of each dataset below the data root, as the site loaders read it.
_DATASET_FOLDERS = {"heart_disease": "heart-disease"}


@dataclass(frozen=True)
class ServicePorts:
    """TCP ports of the coordinator-side services."""

    prefect: int = 4200
    mlflow: int = 5000
    aggregation: int = 8600


@dataclass(frozen=True)
class DeploymentSettings:
    """Names, ports, images and network of one deployment.

    Attributes:
        name: value of the deployment label; ``deploy_down`` removes by it.
        host: address the coordinator-side services bind to and sites call.
            With ``network_mode="host"`` and 127.0.0.1 nothing leaves the
            machine.
        ports: the services' ports on ``host``.
        image_prefix: images are tagged ``<image_prefix>-<role>:<image_tag>``.
        image_tag: tag of the built images.
        base_image: the Dockerfiles' ``BASE_IMAGE``; None keeps their default
            (``python:3.11-slim``).
        network_mode: Docker network mode of every container and build.
        worker_poll_seconds: how often a site's Prefect worker polls its pool.
        startup_timeout: seconds to wait for each service's health check.
        kits_dir: the folder that ``medfed provision`` wrote (``aggregation``,
            ``coordinator``, ``site-<id>``). With it the aggregation service
            serves HTTPS with mutual TLS from its kit, and each site mounts
            its own kit. Without it the service serves plain HTTP and
            accepts unsigned updates, so it is only safe on loopback.
    """

    name: str = "medfed"
    host: str = "127.0.0.1"
    ports: ServicePorts = field(default_factory=ServicePorts)
    image_prefix: str = "localhost/medfed"
    image_tag: str = "dev"
    base_image: str | None = None
    network_mode: str = "host"
    worker_poll_seconds: float = 5.0
    startup_timeout: float = 180.0
    kits_dir: Path | None = None

    def image(self, role: str) -> str:
        return f"{self.image_prefix}-{role}:{self.image_tag}"

    def container_name(self, role: str, site: str | None = None) -> str:
        return f"{self.name}-{role}" if site is None else f"{self.name}-{role}-{site}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.ports.prefect}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def aggregation_url(self) -> str:
        scheme = "http" if self.kits_dir is None else "https"
        return f"{scheme}://{self.host}:{self.ports.aggregation}"

    @property
    def aggregation_kit(self) -> Path | None:
        """The aggregation service's kit below ``kits_dir``, if kits are used."""
        return None if self.kits_dir is None else self.kits_dir / AGGREGATION_KIT


@dataclass(frozen=True)
class SiteContainerSpec:
    """The mounts of one site container.

    Attributes:
        site_id: the study's site identifier; the worker polls ``site-<id>``.
        data_files: host path of each data file, mapped to its path relative
            to the container's data directory. Nothing else is mounted there.
        keys_dir: host folder with the site's startup kit (from
            ``medfed provision``), mounted read-only, or None to send
            unsigned updates without client certificates.
    """

    site_id: str
    data_files: Mapping[Path, str]
    keys_dir: Path | None = None


@dataclass
class RunningDeployment:
    """URLs of the started services and the names of their containers.

    ``kits_dir`` is the provisioned kits folder the deployment uses, or None
    when the aggregation service runs without mutual TLS.
    """

    name: str
    prefect_api_url: str
    mlflow_url: str
    aggregation_url: str
    containers: dict[str, str] = field(default_factory=dict)
    deployments: dict[str, str] = field(default_factory=dict)
    kits_dir: Path | None = None


def connect(base_url: str | None = None) -> Any:
    """Return a ``docker.DockerClient`` for ``base_url``, else for ``DOCKER_HOST``.

    Raises:
        DeployError: no engine responds at that address.
    """
    import docker
    from docker.errors import DockerException

    try:
        client = (
            docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        )
        client.ping()
    except DockerException as error:
        raise DeployError(
            f"no container engine responds at {base_url or 'DOCKER_HOST'}: {error}; "
            "start Docker, or run scripts/containers/setup.sh and "
            "'source .podman/env' to use podman"
        ) from None
    return client


def prepare_build_context(
    context_dir: Path,
    *,
    ca_bundle: Path | None = None,
    torch_wheel: Path | None = None,
) -> None:
    """Place the optional build inputs in ``context_dir/images/build-inputs``.

    The Docker Engine API cannot mount host folders into a build, so the CA
    bundle that pip must trust and a local torch wheel travel in the build
    context. Inputs that are not given are removed, so a build never picks up
    a stale file from an earlier call.

    Raises:
        ConfigError: a given file does not exist or the wheel is not a torch
            wheel.
    """
    inputs = context_dir / BUILD_INPUTS
    inputs.mkdir(parents=True, exist_ok=True)
    bundle_target = inputs / "ca-bundle.crt"
    wheels = inputs / "wheels"
    if ca_bundle is None:
        bundle_target.unlink(missing_ok=True)
    else:
        _require_file(ca_bundle, "CA bundle")
        shutil.copyfile(ca_bundle, bundle_target)
    shutil.rmtree(wheels, ignore_errors=True)
    if torch_wheel is not None:
        _require_file(torch_wheel, "torch wheel")
        if not (torch_wheel.name.startswith("torch-") and torch_wheel.suffix == ".whl"):
            raise ConfigError(
                f"torch wheel {str(torch_wheel)!r} is not named torch-*.whl; "
                "pass the wheel file that pip download torch produces"
            )
        wheels.mkdir()
        # A hard link avoids copying about 200 MB when both paths share a disk.
        try:
            (wheels / torch_wheel.name).hardlink_to(torch_wheel)
        except OSError:
            shutil.copyfile(torch_wheel, wheels / torch_wheel.name)


def build_images(
    client: Any,
    settings: DeploymentSettings,
    *,
    context_dir: Path = REPOSITORY_ROOT,
    roles: Iterable[str] = IMAGE_ROLES,
) -> dict[str, float]:
    """Build the images for ``roles`` from ``context_dir``.

    Returns:
        Wall time of each build in seconds, by role.

    Raises:
        DeployError: a build step failed; the message ends with the build's
            last output lines.
    """
    build_args = (
        {} if settings.base_image is None else {"BASE_IMAGE": settings.base_image}
    )
    seconds = {}
    for role in roles:
        started = time.monotonic()
        logger.info("building %s from %s", settings.image(role), context_dir)
        output: list[str] = []
        for chunk in client.api.build(
            path=str(context_dir),
            dockerfile=f"images/{role}.Dockerfile",
            tag=settings.image(role),
            buildargs=build_args,
            network_mode=settings.network_mode,
            rm=True,
            decode=True,
        ):
            if "stream" in chunk:
                output.extend(chunk["stream"].splitlines())
            if "error" in chunk:
                tail = "\n".join(output[-15:])
                raise DeployError(
                    f"building {settings.image(role)} failed: {chunk['error']}\n{tail}"
                )
        seconds[role] = time.monotonic() - started
        logger.info("built %s in %.0f s", settings.image(role), seconds[role])
    return seconds


def start_coordinator(client: Any, settings: DeploymentSettings) -> dict[str, str]:
    """Start the Prefect server, MLflow server and aggregation service.

    Waits until each passes its health check.

    Returns:
        Container name by role ("prefect", "mlflow", "aggregation").

    Raises:
        DeployError: a container exited or did not become healthy in time.
    """
    host, ports = settings.host, settings.ports
    commands = {
        "prefect": (
            "coordinator",
            ["prefect", "server", "start", "--host", host, "--port", str(ports.prefect)],
            f"{settings.prefect_api_url}/health",
        ),
        "mlflow": (
            "coordinator",
            [
                "mlflow", "server", "--host", host, "--port", str(ports.mlflow),
                "--backend-store-uri", f"sqlite:///{STATE_DIR}/mlflow.db",
                "--artifacts-destination", f"{STATE_DIR}/artifacts",
                "--workers", "1",
            ],
            f"{settings.mlflow_url}/health",
        ),
        "aggregation": (
            "aggregation",
            [
                "medfed", "serve-aggregator", "--host", host,
                "--port", str(ports.aggregation), "--state-dir", STATE_DIR,
            ],
            f"{settings.aggregation_url}/health",
        ),
    }  # fmt: skip
    kit = settings.aggregation_kit
    if kit is not None:
        require_readable_kit(kit)
        commands["aggregation"][1].extend(["--kit-dir", SITE_KEYS_DIR])
    names = {}
    for role, (image_role, command, _) in commands.items():
        volumes = {_volume(client, settings, role): {"bind": STATE_DIR, "mode": "rw"}}
        if role == "aggregation" and kit is not None:
            volumes[str(kit)] = {"bind": SITE_KEYS_DIR, "mode": "ro"}
        names[role] = _run_container(
            client,
            settings,
            role=role,
            image=settings.image(image_role),
            command=command,
            environment={"PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            volumes=volumes,
        )
    # The health check only authenticates the service, with the study CA.
    verify: ssl.SSLContext | bool = (
        True
        if kit is None
        else ssl.create_default_context(cafile=str(kit / KitFiles.CA_CERT))
    )
    for role, (_, _, health_url) in commands.items():
        _wait_until_healthy(
            client, names[role], health_url, settings.startup_timeout, verify=verify
        )
    return names


def start_site(
    client: Any, settings: DeploymentSettings, spec: SiteContainerSpec
) -> str:
    """Start one site's Prefect worker container; return its name.

    The container mounts only the files in ``spec.data_files`` (read-only)
    below its data directory, the site's keys (read-only) and its own state
    volume. It publishes no port.
    """
    volumes: dict[str, dict[str, str]] = {
        _volume(client, settings, "site", spec.site_id): {
            "bind": STATE_DIR,
            "mode": "rw",
        }
    }
    for host_path, relative in spec.data_files.items():
        volumes[str(host_path)] = {"bind": f"{SITE_DATA_DIR}/{relative}", "mode": "ro"}
    environment = {
        "MEDFED_SITE_ID": spec.site_id,
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_WORKER_QUERY_SECONDS": str(settings.worker_poll_seconds),
    }
    if spec.keys_dir is not None:
        require_readable_kit(spec.keys_dir)
        volumes[str(spec.keys_dir)] = {"bind": SITE_KEYS_DIR, "mode": "ro"}
        # The site signs its uploads and authenticates with this startup kit.
        environment["MEDFED_KIT_DIR"] = SITE_KEYS_DIR
    return _run_container(
        client,
        settings,
        role="site",
        site=spec.site_id,
        image=settings.image("site"),
        command=None,
        environment=environment,
        volumes=volumes,
        hardened=True,
    )


def site_container_specs(
    config: StudyConfig,
    *,
    data_root: Path | None = None,
    keys_root: Path | None = None,
) -> list[SiteContainerSpec]:
    """Derive each site's mounts from the study config.

    Each site gets only its own source file. The site's keys are
    ``keys_root/site-<site_id>`` (the layout ``medfed provision`` writes) or
    else ``keys_root/<site_id>``, whichever exists first; a site without
    either runs without keys.

    Raises:
        ConfigError: the dataset has no per-site files, a site names no
            source, or a source file is missing.
    """
    folder = _DATASET_FOLDERS.get(config.data.dataset)
    if folder is None:
        raise ConfigError(
            f"medfed deploy cannot mount data of dataset {config.data.dataset!r}; "
            f"supported: {', '.join(sorted(_DATASET_FOLDERS))}"
        )
    root = (data_root or resolve_data_root(config.data.root)).resolve()
    specs = []
    for site in config.sites:
        if site.source is None:
            raise ConfigError(
                f"site {site.id!r} has no 'source'; name its data file below {folder}/"
            )
        path = root / folder / site.source
        if not path.is_file():
            raise ConfigError(
                f"data file {str(path)!r} of site {site.id!r} not found; set "
                "MEDFED_DATA_DIR or data.root to the folder that contains "
                f"{folder}/"
            )
        keys = None
        if keys_root is not None:
            candidates = (keys_root / site_kit_name(site.id), keys_root / site.id)
            keys = next((path for path in candidates if path.is_dir()), None)
        specs.append(
            SiteContainerSpec(
                site_id=site.id,
                data_files={path: f"{folder}/{site.source}"},
                keys_dir=keys,
            )
        )
    return specs


def deploy_up(
    config_path: Path,
    *,
    settings: DeploymentSettings | None = None,
    data_root: Path | None = None,
    keys_root: Path | None = None,
    build: bool = True,
    ca_bundle: Path | None = None,
    torch_wheel: Path | None = None,
    client: Any = None,
) -> RunningDeployment:
    """Build the images, start the coordinator side and one container per site.

    Args:
        config_path: the study config; its sites decide the site containers.
        settings: names, ports and images; defaults to ``DeploymentSettings()``.
        data_root: host folder with the datasets; resolved like the sites do
            (``data.root``, ``MEDFED_DATA_DIR``, ``../shared/data``) when None.
        keys_root: host folder with one keys folder per site id; defaults to
            ``settings.kits_dir``.
        build: build the images first; False reuses existing images.
        ca_bundle: extra CA bundle for pip during the builds.
        torch_wheel: a local torch wheel to install instead of downloading it.
        client: a ``docker.DockerClient``; ``connect()`` when None.

    Raises:
        ConfigError: the study config or a site's data is invalid.
        DeployError: the engine, a build or a container failed.
    """
    from medfed.flows.deployments import register_site_deployments

    settings = settings or DeploymentSettings()
    config = load_study_config(config_path)
    specs = site_container_specs(
        config, data_root=data_root, keys_root=keys_root or settings.kits_dir
    )
    if settings.kits_dir is not None:
        missing = [spec.site_id for spec in specs if spec.keys_dir is None]
        if missing:
            raise ConfigError(
                f"kits folder {settings.kits_dir} has no kit for sites {missing}; "
                "run medfed provision with this study config"
            )
    client = client or connect()
    if build:
        prepare_build_context(
            REPOSITORY_ROOT, ca_bundle=ca_bundle, torch_wheel=torch_wheel
        )
        build_images(client, settings)
    running = RunningDeployment(
        name=settings.name,
        prefect_api_url=settings.prefect_api_url,
        mlflow_url=settings.mlflow_url,
        aggregation_url=settings.aggregation_url,
        kits_dir=settings.kits_dir,
    )
    running.containers.update(start_coordinator(client, settings))
    # Pools and deployments exist before the workers start, so each worker
    # joins a pool the coordinator made rather than creating its own.
    running.deployments.update(
        register_site_deployments(
            [spec.site_id for spec in specs], api_url=settings.prefect_api_url
        )
    )
    for spec in specs:
        running.containers[f"site-{spec.site_id}"] = start_site(client, settings, spec)
    logger.info(
        "deployment %s running: %d sites, Prefect API %s",
        settings.name, len(specs), settings.prefect_api_url,
    )  # fmt: skip
    return running


def deploy_down(
    *, name: str = "medfed", remove_volumes: bool = False, client: Any = None
) -> list[str]:
    """Stop and remove every container labelled with deployment ``name``.

    Args:
        name: the deployment label value given to ``deploy_up``.
        remove_volumes: also remove the deployment's volumes. This deletes
            the sites' privacy ledgers and the study history.
        client: a ``docker.DockerClient``; ``connect()`` when None.

    Returns:
        Names of the removed containers, then of the removed volumes.
    """
    client = client or connect()
    selector = {"label": f"{LABEL_DEPLOYMENT}={name}"}
    removed = []
    for container in client.containers.list(all=True, filters=selector):
        logger.info("removing container %s", container.name)
        container.remove(force=True)
        removed.append(container.name)
    if remove_volumes:
        for volume in client.volumes.list(filters=selector):
            logger.info("removing volume %s", volume.name)
            volume.remove(force=True)
            removed.append(volume.name)
    return removed


def _run_container(
    client: Any,
    settings: DeploymentSettings,
    *,
    role: str,
    image: str,
    command: list[str] | None,
    environment: dict[str, str],
    volumes: dict[str, dict[str, str]],
    site: str | None = None,
    hardened: bool = False,
) -> str:
    """Start a labelled container, replacing one of the same name.

    ``hardened`` makes the root file system read-only (with a tmpfs at /tmp),
    drops every capability and forbids privilege escalation.
    """
    from docker.errors import NotFound

    name = settings.container_name(role, site)
    try:
        client.containers.get(name).remove(force=True)
        logger.info("replaced existing container %s", name)
    except NotFound:
        pass
    labels = {LABEL_DEPLOYMENT: settings.name, LABEL_ROLE: role}
    if site is not None:
        labels[LABEL_SITE] = site
    options: dict[str, Any] = {}
    if hardened:
        options = {
            "read_only": True,
            "tmpfs": {"/tmp": "rw,size=256m"},
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
        }
    client.containers.run(
        image,
        command,
        name=name,
        detach=True,
        labels=labels,
        environment=environment,
        volumes=volumes,
        network_mode=settings.network_mode,
        **options,
    )
    logger.info("started container %s from %s", name, image)
    return name


def _volume(
    client: Any, settings: DeploymentSettings, role: str, site: str | None = None
) -> str:
    name = f"{settings.container_name(role, site)}-state"
    labels = {LABEL_DEPLOYMENT: settings.name, LABEL_ROLE: role}
    if site is not None:
        labels[LABEL_SITE] = site
    from docker.errors import NotFound

    try:
        client.volumes.get(name)
    except NotFound:
        client.volumes.create(name=name, labels=labels)
    return name


def _wait_until_healthy(
    client: Any,
    container_name: str,
    url: str,
    timeout: float,
    *,
    verify: ssl.SSLContext | bool = True,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container = client.containers.get(container_name)
        if container.status in {"exited", "dead"}:
            raise DeployError(
                f"container {container_name} exited during start-up:\n"
                + _log_tail(container)
            )
        try:
            if httpx.get(url, timeout=2.0, verify=verify).status_code == 200:
                logger.info("container %s is healthy at %s", container_name, url)
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DeployError(
        f"container {container_name} was not healthy at {url} within {timeout:.0f} s:\n"
        + _log_tail(client.containers.get(container_name))
    )


def _log_tail(container: Any, lines: int = 20) -> str:
    return str(container.logs(tail=lines).decode("utf-8", errors="replace"))


def require_readable_kit(kit_dir: Path) -> None:
    """Check that the images' ``medfed`` user can read every file of a kit.

    Kits hold private keys with mode 0600, and a bind mount keeps the host's
    owners, so the kit's owner must be uid 10001 (or its files readable by
    group 10001 or by everyone).

    Raises:
        ConfigError: the kit is missing or a file or folder of it is not
            readable by uid 10001; the message names the fix.
    """
    if not (kit_dir / KitFiles.CA_CERT).is_file():
        raise ConfigError(
            f"{kit_dir} is not a startup kit (no {KitFiles.CA_CERT}); pass a kit "
            "folder that medfed provision wrote"
        )
    for folder, _, files in os.walk(kit_dir):
        for path in [Path(folder), *(Path(folder) / name for name in files)]:
            if not _readable_by_image_user(path):
                raise ConfigError(
                    f"{path} is not readable by uid {IMAGE_USER_ID}, the user the "
                    f"medfed images run as; run 'chown -R {IMAGE_USER_ID}:"
                    f"{IMAGE_USER_ID} {kit_dir}' (keep its modes) before deploying"
                )


def _readable_by_image_user(path: Path) -> bool:
    info = path.stat()
    # A folder needs read and search permission, a file read permission.
    needed = 0o5 if stat.S_ISDIR(info.st_mode) else 0o4
    if info.st_uid == IMAGE_USER_ID:
        return (info.st_mode >> 6) & needed == needed
    if info.st_gid == IMAGE_USER_ID:
        return (info.st_mode >> 3) & needed == needed
    return info.st_mode & needed == needed


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found; pass the path of a file")
