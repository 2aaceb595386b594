"""A small numpy federation on the UCI heart-disease files, for strategy tests.

Five sites: the Cleveland file split in two halves, then Hungary,
Switzerland and Long Beach VA. With ``by_hospital=False`` the 920 records are
pooled and dealt to five sites at random instead. Each site has a seeded
66/34 train/test split.
Features are the ten columns present in all four files (slope, ca and thal
are mostly missing outside Cleveland), missing values are filled with the
pooled training mean and features are standardized with pooled training
statistics. Pooling those statistics is a shortcut of this simulation: a real
study computes them per site or with a federated protocol.

Local training is full-batch gradient descent on the logistic loss, so runs
are deterministic and take milliseconds.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.aggregation.strategies import SiteUpdate, Strategy

DATA_DIR = Path("/work/shared/data/heart-disease")
if not DATA_DIR.is_dir():
    DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "heart-disease"

FILES = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
FEATURE_COLUMNS = list(range(10))
LABEL_COLUMN = 13


@dataclass(frozen=True)
class SiteData:
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [
        [np.nan if field == "?" else float(field) for field in line.split(",")]
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    table = np.asarray(rows, np.float64)
    return table[:, FEATURE_COLUMNS], (table[:, LABEL_COLUMN] > 0).astype(np.float64)


def _hospital_parts() -> list[tuple[str, np.ndarray, np.ndarray]]:
    parts = []
    for name, file_name in FILES.items():
        features, labels = _read(DATA_DIR / file_name)
        if name == "cleveland":
            half = len(labels) // 2
            parts.append(("cleveland-a", features[:half], labels[:half]))
            parts.append(("cleveland-b", features[half:], labels[half:]))
        else:
            parts.append((name, features, labels))
    return parts


def _shuffled_parts(seed: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    hospitals = _hospital_parts()
    features = np.concatenate([part[1] for part in hospitals])
    labels = np.concatenate([part[2] for part in hospitals])
    order = np.random.default_rng(seed).permutation(len(labels))
    return [
        (f"site-{index}", features[chunk], labels[chunk])
        for index, chunk in enumerate(np.array_split(order, len(hospitals)))
    ]


def load_sites(*, by_hospital: bool = True, seed: int = 0) -> list[SiteData]:
    """Return five sites with standardized features.

    Args:
        by_hospital: keep the hospitals' own records per site (heterogeneous);
            otherwise pool all records and deal them to five sites at random.
        seed: seed of the shuffles and of the train/test splits.
    """
    rng = np.random.default_rng(seed)
    raw: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    parts = _hospital_parts() if by_hospital else _shuffled_parts(seed)
    for name, x, y in parts:
        order = rng.permutation(len(y))
        cut = round(0.66 * len(y))
        train, test = order[:cut], order[cut:]
        raw.append((name, x[train], y[train], x[test], y[test]))
    pooled = np.concatenate([site[1] for site in raw])
    mean = np.nanmean(pooled, axis=0)
    filled = np.where(np.isnan(pooled), mean, pooled)
    std = filled.std(axis=0) + 1e-8

    def standardize(x: np.ndarray) -> np.ndarray:
        return (np.where(np.isnan(x), mean, x) - mean) / std

    return [
        SiteData(name, standardize(tx), ty, standardize(vx), vy)
        for name, tx, ty, vx, vy in raw
    ]


def _gradient(
    weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> dict[str, np.ndarray]:
    logits = x @ weights["weight"] + weights["bias"]
    error = 1 / (1 + np.exp(-logits)) - y
    return {"weight": x.T @ error / len(y), "bias": np.array([error.mean()])}


def train_locally(
    weights: dict[str, np.ndarray], site: SiteData, *, steps: int, learning_rate: float
) -> dict[str, np.ndarray]:
    """Return the site's delta after ``steps`` of full-batch gradient descent."""
    local = {key: value.astype(np.float64) for key, value in weights.items()}
    for _ in range(steps):
        gradient = _gradient(local, site.train_x, site.train_y)
        local = {key: local[key] - learning_rate * gradient[key] for key in local}
    return {key: (local[key] - weights[key]).astype(np.float32) for key in local}


def accuracy(weights: dict[str, np.ndarray], sites: list[SiteData]) -> float:
    """Return the pooled test accuracy of ``weights``."""
    x = np.concatenate([site.test_x for site in sites])
    y = np.concatenate([site.test_y for site in sites])
    predictions = (x @ weights["weight"] + weights["bias"]) > 0
    return float(np.mean(predictions == y))


Attack = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def run_federation(
    strategy: Strategy,
    sites: list[SiteData],
    *,
    rounds: int = 30,
    steps: int = 5,
    learning_rate: float = 0.3,
    attacker: str | None = None,
    attack: Attack | None = None,
) -> dict[str, np.ndarray]:
    """Run ``rounds`` of every site training and return the final global model.

    The site named ``attacker`` uploads ``attack(honest_delta)`` instead of
    its honest delta, with its honest sample count.
    """
    features = sites[0].train_x.shape[1]
    weights = {
        "weight": np.zeros(features, np.float32),
        "bias": np.zeros(1, np.float32),
    }
    for _ in range(rounds):
        updates = []
        for site in sites:
            delta = train_locally(
                weights, site, steps=steps, learning_rate=learning_rate
            )
            if site.name == attacker and attack is not None:
                delta = attack(delta)
            updates.append(SiteUpdate(site.name, delta, len(site.train_y)))
        weights = strategy.aggregate(weights, updates)
    return weights
