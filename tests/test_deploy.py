"""medfed.deploy without a container engine: mounts, build inputs, errors.

The containers tier (tests/containers) runs the same code against podman.
"""

from pathlib import Path

import pytest

from medfed.contract.config import load_study_config, parse_study_config
from medfed.deploy import (
    DeploymentSettings,
    connect,
    prepare_build_context,
    require_readable_kit,
    site_container_specs,
)
from medfed.errors import ConfigError, DeployError
from medfed.flows.deployments import site_deployment_name, site_pool_name
from medfed.provision import provision
from tests.conftest import CONFIGS
from tests.test_cli import run_medfed


def test_each_site_mounts_only_its_file(data_root: Path) -> None:
    config = load_study_config(CONFIGS / "heart_disease.yaml")

    specs = site_container_specs(config, data_root=data_root)

    assert [spec.site_id for spec in specs] == [site.id for site in config.sites]
    for spec, site in zip(specs, config.sites, strict=True):
        assert spec.data_files == {
            data_root.resolve() / "heart-disease" / str(site.source): (
                f"heart-disease/{site.source}"
            )
        }
        assert spec.keys_dir is None


def test_site_keys_folder_is_mounted(data_root: Path, tmp_path: Path) -> None:
    config = load_study_config(CONFIGS / "heart_disease.yaml")
    (tmp_path / "cleveland").mkdir()

    specs = site_container_specs(config, data_root=data_root, keys_root=tmp_path)

    keys = {spec.site_id: spec.keys_dir for spec in specs}
    assert keys["cleveland"] == tmp_path / "cleveland"
    assert keys["hungary"] is None


def test_provisioned_site_kits_are_mounted(data_root: Path, tmp_path: Path) -> None:
    config = load_study_config(CONFIGS / "heart_disease.yaml")
    kits = tmp_path / "kits"
    provision(CONFIGS / "heart_disease.yaml", kits)

    specs = site_container_specs(config, data_root=data_root, keys_root=kits)

    keys = {spec.site_id: spec.keys_dir for spec in specs}
    assert keys == {site.id: kits / f"site-{site.id}" for site in config.sites}


def test_kits_switch_aggregation_to_https(tmp_path: Path) -> None:
    plain = DeploymentSettings()
    with_kits = DeploymentSettings(kits_dir=tmp_path)

    assert plain.aggregation_url == "http://127.0.0.1:8600"
    assert plain.aggregation_kit is None
    assert with_kits.aggregation_url == "https://127.0.0.1:8600"
    assert with_kits.aggregation_kit == tmp_path / "aggregation"


def test_kit_unreadable_by_image_user_rejected(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(CONFIGS / "heart_disease.yaml", kits)

    with pytest.raises(ConfigError) as raised:
        require_readable_kit(kits / "aggregation")

    message = str(raised.value)
    assert "is not readable by uid 10001" in message
    assert f"chown -R 10001:10001 {kits / 'aggregation'}" in message


def test_kit_readable_by_everyone_accepted(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    provision(CONFIGS / "heart_disease.yaml", kits)
    kit = kits / "site-cleveland"
    kit.chmod(0o755)
    for path in kit.iterdir():
        path.chmod(0o644)

    require_readable_kit(kit)


def test_folder_without_kit_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        require_readable_kit(tmp_path)

    assert f"{tmp_path} is not a startup kit (no ca.crt)" in str(raised.value)


def test_missing_site_file_names_path(tmp_path: Path) -> None:
    config = load_study_config(CONFIGS / "heart_disease.yaml")

    with pytest.raises(ConfigError) as raised:
        site_container_specs(config, data_root=tmp_path)

    message = str(raised.value)
    assert "processed.cleveland.data" in message
    assert "of site 'cleveland' not found" in message
    assert "MEDFED_DATA_DIR" in message


def test_dataset_without_site_files_rejected(data_root: Path) -> None:
    raw = load_study_config(CONFIGS / "heart_disease.yaml").model_dump()
    raw["data"]["dataset"] = "pneumoniamnist"
    config = parse_study_config(raw)

    with pytest.raises(ConfigError) as raised:
        site_container_specs(config, data_root=data_root)

    assert "cannot mount data of dataset 'pneumoniamnist'" in str(raised.value)
    assert "supported: heart_disease" in str(raised.value)


def test_build_inputs_replace_stale_files(tmp_path: Path) -> None:
    bundle = tmp_path / "proxy.crt"
    bundle.write_text("certificate")
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    context = tmp_path / "context"

    prepare_build_context(context, ca_bundle=bundle, torch_wheel=wheel)
    inputs = context / "images" / "build-inputs"
    assert (inputs / "ca-bundle.crt").read_text() == "certificate"
    assert (inputs / "wheels" / wheel.name).read_bytes() == b"wheel"

    prepare_build_context(context)
    assert not (inputs / "ca-bundle.crt").exists()
    assert not (inputs / "wheels").exists()


def test_build_input_must_be_torch_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "numpy-2.0-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")

    with pytest.raises(ConfigError) as raised:
        prepare_build_context(tmp_path / "context", torch_wheel=wheel)

    assert "is not named torch-*.whl" in str(raised.value)


def test_missing_ca_bundle_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        prepare_build_context(tmp_path, ca_bundle=tmp_path / "absent.crt")

    assert "CA bundle" in str(raised.value)
    assert "absent.crt' not found" in str(raised.value)


def test_connect_without_engine_fails(tmp_path: Path) -> None:
    socket = tmp_path / "absent.sock"

    with pytest.raises(DeployError) as raised:
        connect(f"unix://{socket}")

    assert f"no container engine responds at unix://{socket}" in str(raised.value)
    assert "scripts/containers/setup.sh" in str(raised.value)


def test_pool_names_follow_site_ids() -> None:
    assert site_pool_name("long-beach") == "site-long-beach"
    assert site_deployment_name("site_round", "hungary") == "site_round/site-hungary"


def test_pool_name_rejects_invalid_site() -> None:
    with pytest.raises(ConfigError) as raised:
        site_pool_name("../etc")

    assert "invalid site identifier '../etc'" in str(raised.value)


def test_unknown_site_flow_rejected() -> None:
    with pytest.raises(ValueError) as raised:
        site_deployment_name("site_upload", "hungary")

    assert "unknown site flow 'site_upload'" in str(raised.value)


def test_deploy_without_config_exits_2(tmp_path: Path) -> None:
    result = run_medfed("deploy", cwd=tmp_path)

    assert result.returncode == 2
    assert "needs a study config; pass CONFIG or --down" in result.stderr


def test_deploy_down_without_engine_exits_11(tmp_path: Path) -> None:
    socket = tmp_path / "absent.sock"

    result = run_medfed(
        "deploy", "--down", cwd=tmp_path, env={"DOCKER_HOST": f"unix://{socket}"}
    )

    assert result.returncode == 11
    assert "no container engine responds" in result.stderr


def test_deployed_sites_need_aggregation_url(tmp_path: Path) -> None:
    result = run_medfed(
        "run", str(CONFIGS / "heart_disease.yaml"), "--deployed-sites", cwd=tmp_path
    )

    assert result.returncode == 2
    assert "--deployed-sites needs aggregation.url" in result.stderr
