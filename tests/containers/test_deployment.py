"""End-to-end deployment: images, site isolation, a study through work pools.

The coordinator side (Prefect server, MLflow server, aggregation service) and
four site containers run under podman. The study's flow runs in a subprocess
on this machine and reaches them over loopback, as a coordinator would.
"""

import json
import os
import shlex
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from medfed.contract.kits import COORDINATOR_KIT, KitFiles, client_ssl_context
from medfed.deploy import (
    IMAGE_ROLES,
    REPOSITORY_ROOT,
    DeploymentSettings,
    RunningDeployment,
)
from medfed.flows.deployments import site_pool_name

from .support import HEART_SITES, TIMINGS, write_study_config

# The first test also pays for the image builds and the deployment, which take
# up to about 15 minutes on a fresh, loaded two-core machine.
pytestmark = [pytest.mark.containers, pytest.mark.timeout(2400)]

STUDY_TIMEOUT = 900.0

#: Runs a study with its sites deployed; arguments: config, work dir, summary
#: path, coordinator kit, then "resume" to continue the study recorded in the
#: work dir.
_STUDY_SCRIPT = """
import json, sys
from pathlib import Path
from medfed.contract.config import load_study_config
from medfed.flows.training import run_study

config_path, work_dir, summary_path, kit_dir = map(Path, sys.argv[1:5])
config = load_study_config(config_path)
summary = run_study(
    config,
    config_path.read_text(),
    work_dir=work_dir,
    deployed_sites=True,
    resume=sys.argv[5:] == ["resume"],
    kit_dir=kit_dir,
)
summary_path.write_text(json.dumps(summary))
"""


def run_deployed_study(
    config_path: Path,
    running: RunningDeployment,
    work_dir: Path,
    *,
    resume: bool = False,
) -> subprocess.Popen[str]:
    """Start the study's flow in a subprocess pointed at the deployment."""
    environment = {
        **os.environ,
        "PREFECT_API_URL": running.prefect_api_url,
        "MLFLOW_TRACKING_URI": running.mlflow_url,
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    arguments = [
        str(config_path),
        str(work_dir),
        str(work_dir / "summary.json"),
        str(coordinator_kit(running)),
    ]
    if resume:
        arguments.append("resume")
    return subprocess.Popen(
        [sys.executable, "-c", _STUDY_SCRIPT, *arguments],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(
    process: subprocess.Popen[str], work_dir: Path
) -> tuple[int, str, dict[str, Any]]:
    """Wait for a study subprocess; return its status, output and summary."""
    output, _ = process.communicate(timeout=STUDY_TIMEOUT)
    summary_path = work_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return process.returncode, output, summary


def coordinator_kit(running: RunningDeployment) -> Path:
    """Return the coordinator's kit of the deployment's provisioned kits."""
    assert running.kits_dir is not None, "the tier deploys with startup kits"
    return running.kits_dir / COORDINATOR_KIT


def aggregation_round(
    running: RunningDeployment, study: str, round_number: int
) -> httpx.Response:
    """Read a round's status from the service as the coordinator (mutual TLS)."""
    return httpx.get(
        f"{running.aggregation_url}/v1/studies/{study}/rounds/{round_number}",
        verify=client_ssl_context(coordinator_kit(running)),
        timeout=10,
    )


def with_aggregation_url(config_path: Path, url: str) -> Path:
    import yaml

    config = yaml.safe_load(config_path.read_text())
    config["aggregation"] = {"url": url}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


# Images


def test_images_run_as_non_root(
    engine: Any, images: dict[str, float], settings: DeploymentSettings
) -> None:
    for role in IMAGE_ROLES:
        image_config = engine.images.get(settings.image(role)).attrs["Config"]
        assert image_config["User"] == "medfed", role


def test_site_image_exposes_no_port(
    engine: Any, images: dict[str, float], settings: DeploymentSettings
) -> None:
    image_config = engine.images.get(settings.image("site")).attrs["Config"]
    assert not image_config.get("ExposedPorts")


# Site isolation


@pytest.mark.parametrize("site", sorted(HEART_SITES))
def test_site_sees_only_its_own_file(
    engine: Any, deployment: RunningDeployment, settings: DeploymentSettings, site: str
) -> None:
    container = engine.containers.get(settings.container_name("site", site))
    own = f"/data/heart-disease/{HEART_SITES[site]}"

    listing = container.exec_run(["find", "/data", "-type", "f"])
    assert listing.exit_code == 0, listing.output
    assert listing.output.decode().split() == [own]

    read = container.exec_run(["python3", "-c", f"print(len(open({own!r}).read()))"])
    assert read.exit_code == 0, read.output
    assert int(read.output.decode()) > 0

    for other_site, other_file in HEART_SITES.items():
        if other_site == site:
            continue
        probe = container.exec_run(["test", "-e", f"/data/heart-disease/{other_file}"])
        assert probe.exit_code != 0, f"{site} can see {other_file}"


@pytest.mark.parametrize("site", sorted(HEART_SITES))
def test_site_data_mount_is_read_only(
    engine: Any, deployment: RunningDeployment, settings: DeploymentSettings, site: str
) -> None:
    container = engine.containers.get(settings.container_name("site", site))
    write = container.exec_run(["sh", "-c", "echo x >> /data/heart-disease/*"])
    assert write.exit_code != 0
    assert b"Read-only file system" in write.output


def test_site_runs_as_non_root(
    engine: Any, deployment: RunningDeployment, settings: DeploymentSettings
) -> None:
    container = engine.containers.get(settings.container_name("site", "cleveland"))
    identity = container.exec_run(["id", "-u"])
    assert identity.output.decode().strip() == "10001"


def test_aggregation_requires_client_certificate(
    deployment: RunningDeployment,
) -> None:
    assert deployment.aggregation_url.startswith("https://")
    ca = ssl.create_default_context(
        cafile=str(coordinator_kit(deployment) / KitFiles.CA_CERT)
    )
    anonymous = httpx.get(
        f"{deployment.aggregation_url}/v1/studies/heart-three-rounds/rounds/0",
        verify=ca,
        timeout=10,
    )
    assert anonymous.status_code == 401, anonymous.text

    with pytest.raises(httpx.HTTPError):
        httpx.get(
            deployment.aggregation_url.replace("https://", "http://") + "/health",
            timeout=10,
        ).raise_for_status()


# The README's site command


def readme_site_command() -> list[str]:
    """Return the arguments of the README's ``docker run`` for one site."""
    readme = (REPOSITORY_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Deploy at a hospital", 1)[1].split("\n## ", 1)[0]
    block = section.split("docker run", 1)[1].split("\n\n", 1)[0]
    return shlex.split(block.replace("\\\n", " "))


def _options(arguments: list[str], flag: str) -> list[str]:
    return [arguments[i + 1] for i, value in enumerate(arguments) if value == flag]


def test_readme_site_command_matches_tier(
    engine: Any, deployment: RunningDeployment, settings: DeploymentSettings
) -> None:
    command = readme_site_command()
    site = "cleveland"
    container = engine.containers.get(settings.container_name("site", site))

    def run(*arguments: str) -> str:
        result = container.exec_run(list(arguments))
        assert result.exit_code == 0, (arguments, result.output)
        return str(result.output.decode())

    # Process 1 is the container's worker, started with the container's options.
    status = run("cat", "/proc/1/status")
    mounts = {
        fields[1]: fields[3].split(",")
        for fields in (line.split() for line in run("cat", "/proc/mounts").splitlines())
    }
    environment = dict(
        line.split("=", 1) for line in run("env").splitlines() if "=" in line
    )
    readme_environment = dict(value.split("=", 1) for value in _options(command, "-e"))
    readme_volumes = {
        value.split(":")[1]: value.split(":")[2:] for value in _options(command, "-v")
    }

    assert "--read-only" in command
    assert "ro" in mounts["/"]
    assert _options(command, "--tmpfs") == ["/tmp:rw,size=256m"]
    assert "rw" in mounts["/tmp"]
    assert "size=262144k" in mounts["/tmp"]
    assert _options(command, "--cap-drop") == ["ALL"]
    assert "CapEff:\t0000000000000000" in status
    assert _options(command, "--security-opt") == ["no-new-privileges"]
    assert "NoNewPrivs:\t1" in status
    assert not {"-p", "--publish", "-P"} & set(command)

    assert set(readme_environment) == {
        "MEDFED_SITE_ID",
        "MEDFED_KIT_DIR",
        "PREFECT_API_URL",
    }
    assert readme_environment["MEDFED_SITE_ID"] == environment["MEDFED_SITE_ID"]
    assert readme_environment["MEDFED_KIT_DIR"] == environment["MEDFED_KIT_DIR"]
    assert "PREFECT_API_URL" in environment

    data_file = f"/data/heart-disease/{HEART_SITES[site]}"
    assert readme_volumes == {
        data_file: ["ro"],
        "/run/secrets/medfed": ["ro"],
        "/state": [],
    }
    assert "ro" in mounts[data_file]
    assert "ro" in mounts["/run/secrets/medfed"]
    assert "rw" in mounts["/state"]
    assert command[-1].split(":")[0].endswith("medfed-site")


# A study through the work pools


@pytest.fixture(scope="module")
def three_round_study(
    deployment: RunningDeployment, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("study")
    config_path = with_aggregation_url(
        write_study_config(folder, "heart-three-rounds", rounds=3),
        deployment.aggregation_url,
    )
    started = time.monotonic()
    status, output, summary = finish(
        run_deployed_study(config_path, deployment, folder / "work"), folder / "work"
    )
    TIMINGS["three_round_study_seconds"] = time.monotonic() - started
    assert status == 0, output[-4000:]
    return summary


def test_study_finishes_three_rounds(three_round_study: dict[str, Any]) -> None:
    assert three_round_study["rounds"] == 3
    assert three_round_study["model_version"] == 3
    assert 0.0 <= three_round_study["pooled_test_accuracy"] <= 1.0


def test_study_is_recorded_in_mlflow(
    deployment: RunningDeployment, three_round_study: dict[str, Any]
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=deployment.mlflow_url)
    run = client.get_run(three_round_study["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert any(key.startswith("pooled") for key in run.data.metrics), run.data.metrics

    registered = str(three_round_study["registered_model_version"])
    versions = client.search_model_versions(f"name='{'heart-three-rounds'}'")
    assert registered in {version.version for version in versions}


def test_site_flows_ran_in_own_pools(
    deployment: RunningDeployment, three_round_study: dict[str, Any]
) -> None:
    runs = _flow_runs(deployment.prefect_api_url, "heart-three-rounds")
    for site in HEART_SITES:
        pool = site_pool_name(site)
        site_runs = [run for run in runs if run["parameters"].get("site_id") == site]
        train_runs = [
            run
            for run in site_runs
            if run["name"].startswith(f"{site}: heart-three-rounds round")
        ]
        assert len(train_runs) == 3, [run["name"] for run in site_runs]
        assert {run["work_pool_name"] for run in site_runs} == {pool}
        assert {run["state_type"] for run in train_runs} == {"COMPLETED"}


# An asynchronous study through the work pools


@pytest.fixture(scope="module")
def asynchronous_study(
    deployment: RunningDeployment, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("asynchronous")
    config_path = with_aggregation_url(
        write_study_config(
            folder, "heart-asynchronous", rounds=3, asynchronous={"buffer_size": 2}
        ),
        deployment.aggregation_url,
    )
    started = time.monotonic()
    status, output, summary = finish(
        run_deployed_study(config_path, deployment, folder / "work"), folder / "work"
    )
    TIMINGS["asynchronous_study_seconds"] = time.monotonic() - started
    assert status == 0, output[-4000:]
    return summary


def test_asynchronous_study_publishes_versions(
    asynchronous_study: dict[str, Any],
) -> None:
    assert asynchronous_study["asynchronous"]["versions"] == 3
    assert asynchronous_study["model_version"] == 3
    assert asynchronous_study["asynchronous"]["failures"] == []
    updates = [entry["updates"] for entry in asynchronous_study["sites"].values()]
    # Each version takes two arrivals, and every site trains at most 3 times.
    assert sum(updates) >= 6
    assert max(updates) <= 3


def test_asynchronous_updates_ran_in_own_pools(
    deployment: RunningDeployment, asynchronous_study: dict[str, Any]
) -> None:
    runs = _flow_runs(deployment.prefect_api_url, "heart-asynchronous")
    for site in HEART_SITES:
        update_runs = [
            run
            for run in runs
            if run["name"].startswith(f"{site}: heart-asynchronous update")
        ]
        accepted = asynchronous_study["sites"][site]["updates"]
        assert len(update_runs) >= accepted, [run["name"] for run in runs]
        assert {run["work_pool_name"] for run in update_runs} == {site_pool_name(site)}
        assert {run["state_type"] for run in update_runs} <= {
            "COMPLETED",
            "CANCELLED",
        }


def _flow_runs(api_url: str, study: str) -> list[dict[str, Any]]:
    """Return the flow runs whose name contains ``study``, at most 200.

    The filter keeps the count under the limit, which all of the tier's
    studies together could pass.
    """
    body = {"limit": 200, "flow_runs": {"name": {"like_": study}}}
    response = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=30)
    response.raise_for_status()
    runs: list[dict[str, Any]] = response.json()
    return runs


# A site that stops mid-study


def run_and_stop_site(
    config_path: Path,
    running: RunningDeployment,
    work_dir: Path,
    container: Any,
    *,
    stop_when: Callable[[subprocess.Popen[str]], None],
    timing: str,
) -> tuple[int, str, dict[str, Any]]:
    """Run a deployed study and stop ``container`` once ``stop_when`` returns.

    The container starts again when the study ends, and the study's wall
    time goes to ``TIMINGS[timing]``. Returns what ``finish`` returns.
    """
    process = run_deployed_study(config_path, running, work_dir)
    stopper_error: list[BaseException] = []

    def stop() -> None:
        try:
            stop_when(process)
            container.stop(timeout=5)
        except BaseException as error:
            stopper_error.append(error)

    stopper = threading.Thread(target=stop)
    started = time.monotonic()
    stopper.start()
    try:
        result = finish(process, work_dir)
        stopper.join()
    finally:
        TIMINGS[timing] = time.monotonic() - started
        container.start()
    assert not stopper_error, stopper_error
    return result


def _wait_for_finalized_round(
    running: RunningDeployment,
    study: str,
    round_number: int,
    timeout: float,
    process: subprocess.Popen[str],
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output, _ = process.communicate()
            raise AssertionError(
                f"study {study} exited before round {round_number} was "
                f"finalized:\n{output[-4000:]}"
            )
        response = aggregation_round(running, study, round_number)
        if response.status_code == 200 and response.json()["state"] == "finalized":
            return
        time.sleep(1.0)
    raise AssertionError(
        f"round {round_number} of {study} not finalized within {timeout} s"
    )


STOPPED_STUDY = "heart-site-stops"
RESUMED_STUDY = "heart-resumed"

#: Round deadline of the studies that lose a site. A site's flow run takes
#: about a minute on a loaded two-core machine (process start and imports),
#: so a shorter deadline would also close rounds on the healthy sites.
SHORT_DEADLINE_SECONDS = 150.0


@pytest.fixture(scope="module")
def study_with_stopped_site(
    engine: Any,
    deployment: RunningDeployment,
    settings: DeploymentSettings,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Run two rounds with quorum 3; stop site switzerland after round 0."""
    folder = tmp_path_factory.mktemp("stopped")
    config_path = with_aggregation_url(
        write_study_config(
            folder,
            STOPPED_STUDY,
            rounds=2,
            deadline_seconds=SHORT_DEADLINE_SECONDS,
            quorum=3,
        ),
        deployment.aggregation_url,
    )
    container = engine.containers.get(settings.container_name("site", "switzerland"))
    status, output, summary = run_and_stop_site(
        config_path,
        deployment,
        folder / "work",
        container,
        stop_when=lambda process: _wait_for_finalized_round(
            deployment, STOPPED_STUDY, 0, STUDY_TIMEOUT, process
        ),
        timing="stopped_site_study_seconds",
    )
    assert status == 0, output[-4000:]
    rounds = {
        number: aggregation_round(deployment, STOPPED_STUDY, number).json()
        for number in range(2)
    }
    return {"summary": summary, "rounds": rounds, "output": output}


@pytest.fixture(scope="module")
def resumed_study(
    engine: Any,
    deployment: RunningDeployment,
    settings: DeploymentSettings,
    study_with_stopped_site: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Kill the coordinator once round 0 is finalized, stop site switzerland,
    then run with resume: switzerland cannot prepare, so round 1 runs on the
    other three sites (quorum 3)."""
    folder = tmp_path_factory.mktemp("resumed")
    work_dir = folder / "work"
    config_path = with_aggregation_url(
        write_study_config(folder, RESUMED_STUDY, rounds=2, quorum=3),
        deployment.aggregation_url,
    )
    container = engine.containers.get(settings.container_name("site", "switzerland"))
    started = time.monotonic()
    first = run_deployed_study(config_path, deployment, work_dir)
    try:
        _wait_for_finalized_round(deployment, RESUMED_STUDY, 0, STUDY_TIMEOUT, first)
    finally:
        first.kill()
        first.communicate()
    container.stop(timeout=5)
    try:
        status, output, summary = finish(
            run_deployed_study(config_path, deployment, work_dir, resume=True),
            work_dir,
        )
    finally:
        TIMINGS["resumed_study_seconds"] = time.monotonic() - started
        container.start()
    assert status == 0, output[-4000:]
    return {"summary": summary, "output": output}


def test_round_closes_without_stopped_site(
    study_with_stopped_site: dict[str, Any],
) -> None:
    assert study_with_stopped_site["summary"]["rounds"] == 2
    second = study_with_stopped_site["rounds"][1]
    assert second["state"] == "finalized", second
    assert "switzerland" not in second["uploaded"]
    assert len(second["uploaded"]) == 3, second


def test_round_before_stop_keeps_all_uploads(
    study_with_stopped_site: dict[str, Any],
) -> None:
    first = study_with_stopped_site["rounds"][0]
    assert first["state"] == "finalized"
    assert sorted(first["uploaded"]) == sorted(HEART_SITES)


def test_stopped_site_run_is_cancelled(
    deployment: RunningDeployment, study_with_stopped_site: dict[str, Any]
) -> None:
    runs = _flow_runs(deployment.prefect_api_url, STOPPED_STUDY)
    stopped = [
        run for run in runs if run["name"] == f"switzerland: {STOPPED_STUDY} round 1"
    ]
    assert len(stopped) == 1, [run["name"] for run in runs]
    assert stopped[0]["state_type"] == "CANCELLED"


ASYNCHRONOUS_STOPPED_STUDY = "heart-asynchronous-site-stops"


def _wait_for_version(
    running: RunningDeployment,
    study: str,
    version: int,
    timeout: float,
    process: subprocess.Popen[str],
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output, _ = process.communicate()
            raise AssertionError(
                f"study {study} exited before version {version}:\n{output[-4000:]}"
            )
        response = httpx.get(
            f"{running.aggregation_url}/v1/studies/{study}/asynchronous",
            verify=client_ssl_context(coordinator_kit(running)),
            timeout=10,
        )
        if response.status_code == 200 and response.json()["latest_version"] >= version:
            return
        time.sleep(1.0)
    raise AssertionError(f"{study} did not publish version {version} in {timeout} s")


@pytest.fixture(scope="module")
def asynchronous_study_with_stopped_site(
    engine: Any,
    deployment: RunningDeployment,
    settings: DeploymentSettings,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Run an asynchronous study of 4 versions; stop switzerland after version 1."""
    folder = tmp_path_factory.mktemp("asynchronous-stopped")
    config_path = with_aggregation_url(
        write_study_config(
            folder,
            ASYNCHRONOUS_STOPPED_STUDY,
            rounds=4,
            deadline_seconds=SHORT_DEADLINE_SECONDS,
            asynchronous={"buffer_size": 2},
        ),
        deployment.aggregation_url,
    )
    container = engine.containers.get(settings.container_name("site", "switzerland"))
    status, output, summary = run_and_stop_site(
        config_path,
        deployment,
        folder / "work",
        container,
        stop_when=lambda process: _wait_for_version(
            deployment, ASYNCHRONOUS_STOPPED_STUDY, 1, STUDY_TIMEOUT, process
        ),
        timing="asynchronous_stopped_site_seconds",
    )
    assert status == 0, output[-4000:]
    return summary


def test_async_study_survives_stopped_site(
    asynchronous_study_with_stopped_site: dict[str, Any],
) -> None:
    summary = asynchronous_study_with_stopped_site
    assert summary["asynchronous"]["versions"] == 4
    failed = [failure["site"] for failure in summary["asynchronous"]["failures"]]
    assert failed == ["switzerland"]


def test_resumed_study_skips_finished_round(
    deployment: RunningDeployment, resumed_study: dict[str, Any]
) -> None:
    runs = _flow_runs(deployment.prefect_api_url, RESUMED_STUDY)
    for site in HEART_SITES:
        first_round = [
            run for run in runs if run["name"] == f"{site}: {RESUMED_STUDY} round 0"
        ]
        assert len(first_round) == 1, (site, [run["name"] for run in runs])
    for site in sorted(set(HEART_SITES) - {"switzerland"}):
        second_round = [
            run for run in runs if run["name"] == f"{site}: {RESUMED_STUDY} round 1"
        ]
        assert len(second_round) == 1, (site, [run["name"] for run in runs])
    assert resumed_study["summary"]["model_version"] == 2


def test_resume_leaves_out_stopped_site(
    deployment: RunningDeployment, resumed_study: dict[str, Any]
) -> None:
    summary = resumed_study["summary"]
    assert [entry["round"] for entry in summary["participants"]] == [1]
    assert summary["participants"][0]["state"] == "finalized"
    assert summary["participants"][0]["uploaded"] == sorted(
        set(HEART_SITES) - {"switzerland"}
    )
    assert summary["sites"]["switzerland"]["train_records"] is None
    assert "site switzerland could not prepare its data" in resumed_study["output"]

    runs = _flow_runs(deployment.prefect_api_url, RESUMED_STUDY)
    names = [run["name"] for run in runs]
    assert f"switzerland: {RESUMED_STUDY} round 1" not in names
    prepares = [
        run for run in runs if run["name"] == f"switzerland: prepare {RESUMED_STUDY}"
    ]
    assert sorted(run["state_type"] for run in prepares) == ["CANCELLED", "COMPLETED"]


def test_study_without_quorum_fails_clearly(
    engine: Any,
    deployment: RunningDeployment,
    settings: DeploymentSettings,
    study_with_stopped_site: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("no-quorum")
    config_path = with_aggregation_url(
        write_study_config(
            folder, "heart-no-quorum", rounds=1, deadline_seconds=60.0, quorum=4
        ),
        deployment.aggregation_url,
    )
    container = engine.containers.get(settings.container_name("site", "switzerland"))
    container.stop(timeout=5)
    try:
        status, output, _ = finish(
            run_deployed_study(config_path, deployment, folder / "work"),
            folder / "work",
        )
    finally:
        container.start()
    assert status != 0
    assert "site switzerland did not finish site_prepare within 60 s" in output
