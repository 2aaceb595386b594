"""Values shared by the containers tier: the four hospitals, a study config
writer and the record of the tier's wall times."""

from pathlib import Path
from typing import Any

import yaml

#: Wall times of the tier's phases in seconds; conftest writes them to
#: .podman/tier-timings.json when the session ends.
TIMINGS: dict[str, Any] = {}

HEART_SITES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "long-beach": "processed.va.data",
}


def write_study_config(
    folder: Path,
    study: str,
    *,
    rounds: int = 3,
    deadline_seconds: float = 240.0,
    quorum: int | None = None,
    asynchronous: dict[str, Any] | None = None,
) -> Path:
    """Write a small heart-disease study over the four hospitals; return its path.

    ``asynchronous`` becomes the study's ``round.asynchronous`` section.
    """
    config = {
        "study": study,
        "data": {"dataset": "heart_disease", "test_fraction": 0.34, "seed": 42},
        "sites": [
            {"id": site, "source": source} for site, source in HEART_SITES.items()
        ],
        "model": {"name": "logistic_regression", "params": {"in_features": 15}},
        "training": {
            "rounds": rounds,
            "local_epochs": 1,
            "batch_size": 16,
            "learning_rate": 0.05,
        },
        "privacy": {"enabled": True, "epsilon": 5.0, "delta": 1.0e-3},
        "round": {"deadline_seconds": deadline_seconds, "quorum": quorum},
        "tracking": {"experiment": "medfed-containers"},
    }
    if asynchronous is not None:
        config["round"] = {
            "deadline_seconds": deadline_seconds,
            "asynchronous": asynchronous,
        }
    path = folder / f"{study}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
