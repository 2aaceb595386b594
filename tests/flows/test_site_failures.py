"""Studies whose sites cannot train: the study error names each site's reason."""

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from medfed.contract.config import StudyConfig, parse_study_config
from medfed.errors import ConfigError, DataError, QuorumError
from medfed.flows.site_round import prepare_site
from medfed.flows.training import check_local_data, run_study
from medfed.sites.data.heart import HEART_FILES
from medfed.sites.runner import SiteRunner
from tests.conftest import CONFIGS

SITES = ("cleveland", "hungary", "switzerland", "long-beach")


def heart_config(study: str, **changes: Any) -> tuple[StudyConfig, str]:
    raw: dict[str, Any] = yaml.safe_load(
        (CONFIGS / "heart_disease_nodp.yaml").read_text()
    )
    raw["study"] = study
    raw["training"]["rounds"] = 2
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return parse_study_config(raw), yaml.safe_dump(raw)


def copy_heart_files(data_root: Path, target: Path) -> Path:
    folder = target / "heart-disease"
    folder.mkdir(parents=True)
    for spec in HEART_FILES.values():
        shutil.copy(data_root / spec.folder / spec.name, folder / spec.name)
    return target


def test_local_data_check_passes_with_files(data_root: Path, tmp_path: Path) -> None:
    config, _ = heart_config("check-ok", data__root=str(data_root))

    check_local_data(config, tmp_path / "run")

    assert not (tmp_path / "run").exists()


def test_local_data_check_names_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    config, _ = heart_config("check-missing", data__root=str(empty))

    with pytest.raises(DataError) as raised:
        check_local_data(config, tmp_path / "run")

    message = str(raised.value)
    for site, spec in zip(SITES, HEART_FILES.values(), strict=True):
        assert (
            f"site {site}: data file heart-disease/{spec.name} not found in data "
            f"root {empty}" in message
        )
        assert f"SHA-256 {spec.sha256}" in message
        assert f"download it from {spec.url}" in message
    assert "\n" not in message


def test_local_data_check_rejects_altered_file(data_root: Path, tmp_path: Path) -> None:
    root = copy_heart_files(data_root, tmp_path / "data")
    (root / "heart-disease" / "processed.va.data").write_bytes(b"1,2,3\n")
    config, _ = heart_config("check-altered", data__root=str(root))

    with pytest.raises(DataError) as raised:
        check_local_data(config, tmp_path / "run")

    assert str(raised.value).startswith("site long-beach: data file ")
    assert "processed.va.data has SHA-256" in str(raised.value)


def test_local_data_check_skips_prepared_site(data_root: Path, tmp_path: Path) -> None:
    root = copy_heart_files(data_root, tmp_path / "data")
    config, _ = heart_config("check-prepared", data__root=str(root))
    work_dir = tmp_path / "run"
    for site in SITES:
        SiteRunner(config, site, work_dir / "sites" / site).prepare()
    shutil.rmtree(root / "heart-disease")

    check_local_data(config, work_dir)

    hungary = work_dir / "sites" / "hungary" / "studies" / config.study / "data"
    (hungary / "manifest.json").unlink()
    with pytest.raises(DataError) as raised:
        check_local_data(config, work_dir)

    assert str(raised.value).startswith("site hungary: data file ")


def test_local_data_check_requires_heart_source(tmp_path: Path) -> None:
    raw: dict[str, Any] = yaml.safe_load(
        (CONFIGS / "heart_disease_nodp.yaml").read_text()
    )
    raw["sites"][1] = {"id": "hungary"}
    config = parse_study_config(raw)

    with pytest.raises(ConfigError) as raised:
        check_local_data(config, tmp_path / "run")

    assert str(raised.value) == (
        "site hungary: site 'hungary' has no 'source'; name its heart-disease "
        "file, e.g. processed.cleveland.data"
    )


def test_local_data_check_leaves_download_to_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = tmp_path / ".cache" / "medfed" / "data"
    config, _ = heart_config("check-cache", data__root=str(cache))

    check_local_data(config, tmp_path / "run")

    assert not cache.exists()


def test_model_input_check_names_width(data_root: Path, tmp_path: Path) -> None:
    config, _ = heart_config("width", model__params={"in_features": 12})
    runner = SiteRunner(config, "cleveland", tmp_path, data_root=data_root)
    runner.prepare()

    with pytest.raises(ConfigError) as raised:
        runner.check_model_input()

    message = str(raised.value)
    assert message.startswith(
        "model 'logistic_regression' does not accept the records of this site, "
        "which have shape (15,) after preprocessing ("
    )
    assert message.endswith("; set model.params.in_features to 15")


def test_model_input_check_passes_matching_width(
    data_root: Path, tmp_path: Path
) -> None:
    config, _ = heart_config("width-ok")
    runner = SiteRunner(config, "cleveland", tmp_path, data_root=data_root)

    report = prepare_site(runner)

    assert report["train_records"] == 200


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_width_mismatch_stops_before_round_one(tmp_path: Path) -> None:
    config, text = heart_config("width-study", model__params={"in_features": 12})
    rounds: list[int] = []

    with pytest.raises(ConfigError) as raised:
        run_study(
            config,
            text,
            work_dir=tmp_path,
            listener=lambda number, _: rounds.append(number),
        )

    message = str(raised.value)
    for site in SITES:
        assert f"site {site}: model 'logistic_regression' does not accept" in message
    assert message.count("set model.params.in_features to 15") == len(SITES)
    assert rounds == []


@pytest.mark.usefixtures("prefect_api", "mlflow_uri")
def test_failed_sites_named_in_study_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every site misses a 10 ms deadline in round 0, and the study error must
    # give the reason for each of them. Each site waits 2 s before training:
    # on a loaded machine a site could otherwise upload before the flow
    # finalizes the round, and the service would count that upload.
    original = SiteRunner.train_round

    def late_train_round(self: SiteRunner, *args: Any, **kwargs: Any) -> Any:
        time.sleep(2)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SiteRunner, "train_round", late_train_round)
    config, text = heart_config("late-sites", round__deadline_seconds=0.01)

    with pytest.raises(QuorumError) as raised:
        run_study(config, text, work_dir=tmp_path)

    message = str(raised.value)
    assert message.startswith("study 'late-sites' finished no round; site ")
    for site in SITES:
        assert (
            f"site {site} failed: TimeoutError: site {site} did not finish before "
            "the round deadline of 0.01 s" in message
        )
    assert "\n" not in message
