"""Fixtures shared by the security tests: one provisioned study per session."""

from pathlib import Path

import pytest

from medfed.provision import provision

STUDY_CONFIG = """\
study: heart
data: {dataset: heart_disease}
sites:
  - id: alpha
  - id: beta
model: {name: logistic_regression, params: {in_features: 15}}
training: {rounds: 1, learning_rate: 0.05}
aggregation:
  hostnames: [aggregator.example.org, 10.0.0.7]
"""


def study_config_text(
    *, study: str = "heart", sites: str = "[{id: alpha}]", **extra: str
) -> str:
    """Return a valid study config with ``study``, ``sites`` and extra top-level keys."""
    lines = [
        f"study: {study}",
        "data: {dataset: heart_disease}",
        f"sites: {sites}",
        "model: {name: logistic_regression, params: {in_features: 15}}",
        "training: {rounds: 1, learning_rate: 0.05}",
        *(f"{key}: {value}" for key, value in extra.items()),
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def study_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "heart.yaml"
    path.write_text(STUDY_CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def kits(
    study_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Kits of study ``heart``: coordinator, aggregation, site-alpha, site-beta."""
    return provision(study_config, tmp_path_factory.mktemp("kits") / "out")


@pytest.fixture(scope="session")
def foreign_kits(
    study_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Kits of the same study from a second, unrelated CA."""
    return provision(study_config, tmp_path_factory.mktemp("foreign") / "out")
