"""The command line as a user meets it: exit codes and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS


def run_medfed(
    *arguments: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The command uses its own default tracking store (mlflow.db in cwd)
    # unless a test sets one, whatever fixtures set in this process.
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "medfed", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**environment, **(env or {})},
        check=False,
    )


def test_unknown_config_key_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(
        (CONFIGS / "heart_disease.yaml")
        .read_text()
        .replace("batch_size:", "batch_sise:")
    )

    result = run_medfed("run", str(config), cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert (
        "unknown key 'training.batch_sise'; remove it or check its spelling"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_missing_config_exits_with_config_code(tmp_path: Path) -> None:
    result = run_medfed("run", "nowhere.yaml", cwd=tmp_path)

    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "medfed: error: study config 'nowhere.yaml' not found; pass the path of a YAML file"
    )


def test_altered_data_exits_with_data_code(tmp_path: Path, data_root: Path) -> None:
    folder = tmp_path / "data" / "heart-disease"
    folder.mkdir(parents=True)
    for path in (data_root / "heart-disease").glob("processed.*.data"):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "processed.va.data").write_bytes(b"1,2,3\n")

    result = run_medfed(
        "run",
        str(CONFIGS / "heart_disease_nodp.yaml"),
        cwd=tmp_path,
        env={"MEDFED_DATA_DIR": str(tmp_path / "data")},
    )

    assert result.returncode != 0
    assert "processed.va.data has SHA-256" in result.stderr
    assert "replace it with the original file" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_fails_before_services(tmp_path: Path) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(
        (CONFIGS / "heart_disease_nodp.yaml")
        .read_text()
        .replace("name: logistic_regression", "name: resnet_gnn")
    )

    result = run_medfed("run", str(config), cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert (
        "model.name: unknown model; choose one of logistic_regression, resnet_gn, "
        "scatter_gn (got 'resnet_gnn')" in result.stderr
    )
    assert not (tmp_path / ".medfed").exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("compression", "message"),
    [
        (
            # An integer of 400 digits is valid YAML but beyond the float range.
            "{codec: int8, params: {step_rms: 1" + "0" * 400 + "}}",
            "compression: codec 'int8' parameter step_rms must be greater than "
            "0.0 and at most 127.0",
        ),
        (
            "{codec: int8, params: {step_rms: 1.0}, zstd: true, zstd_level: true}",
            "compression.zstd_level: Input should be a valid integer (got True)",
        ),
    ],
    ids=["step_rms beyond float", "zstd_level true"],
)
def test_bad_compression_is_one_line(
    tmp_path: Path, compression: str, message: str
) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(
        (CONFIGS / "heart_disease_nodp.yaml").read_text()
        + f"compression: {compression}\n"
    )

    result = run_medfed("run", str(config), cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".medfed").exists()


def test_cli_module_runs_commands(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0
    assert "serve-aggregator" in result.stdout


def test_configured_root_without_data_fails_before_services(tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    config = tmp_path / "study.yaml"
    config.write_text(
        (CONFIGS / "heart_disease_nodp.yaml")
        .read_text()
        .replace("  seed: 42\n", f"  seed: 42\n  root: {empty}\n")
    )

    # A download attempt would go to this closed local port, never outside.
    closed = "http://127.0.0.1:9"
    result = run_medfed(
        "run",
        str(config),
        cwd=tmp_path,
        env={"http_proxy": closed, "https_proxy": closed, "no_proxy": "127.0.0.1"},
    )

    assert result.returncode == 3
    assert result.stderr.count("\n") == 1
    assert (
        "site cleveland: data file heart-disease/processed.cleveland.data not "
        f"found in data root {empty}" in result.stderr
    )
    assert (
        "SHA-256 a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8"
        in result.stderr
    )
    assert "download from" not in result.stderr
    assert list(empty.iterdir()) == []
    assert list(tmp_path.glob(".medfed/runs/*/aggregation")) == []
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_run_prints_table_and_summary(tmp_path: Path) -> None:
    import json

    summary_path = tmp_path / "summary.json"
    result = run_medfed(
        "run",
        str(CONFIGS / "heart_disease_nodp.yaml"),
        "--summary-json",
        str(summary_path),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "pooled" in result.stdout
    summary = json.loads(summary_path.read_text())
    for key in (
        "pooled_test_accuracy",
        "pooled_test_auc",
        "wall_seconds",
        "rounds",
        "sites",
    ):
        assert key in summary, key
    for values in summary["sites"].values():
        assert {"test_accuracy", "epsilon_spent", "train_records"} <= set(values)
    assert (tmp_path / "mlflow.db").exists()


def test_work_dir_file_is_one_line(tmp_path: Path) -> None:
    occupied = tmp_path / "state"
    occupied.write_text("not a folder")

    result = run_medfed(
        "run",
        str(CONFIGS / "heart_disease_nodp.yaml"),
        "--work-dir",
        str(occupied),
        cwd=tmp_path,
    )

    assert result.returncode == 2
    assert f"--work-dir {occupied} is a file" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_without_earlier_run_rejected(tmp_path: Path) -> None:
    result = run_medfed(
        "run",
        str(CONFIGS / "heart_disease_nodp.yaml"),
        "--resume",
        "--work-dir",
        str(tmp_path / "empty"),
        cwd=tmp_path,
    )

    assert result.returncode == 2
    assert "leave out --resume to start a new one" in result.stderr
    assert not (tmp_path / "empty").exists()


def test_nan_written_as_null() -> None:
    from medfed.cli import _without_nan

    cleaned = _without_nan({"auc": float("nan"), "sites": [{"auc": 0.5}]})

    assert cleaned == {"auc": None, "sites": [{"auc": 0.5}]}


def test_provision_help_shows_out_default(tmp_path: Path) -> None:
    # Rich markup would swallow a "[default: ...]" written into the help text.
    result = run_medfed("provision", "--help", cwd=tmp_path, env={"COLUMNS": "200"})

    assert result.returncode == 0
    assert "kits/<study>" in result.stdout
