"""Personalized layers kept at each site (FedBN and similar).

FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021) keeps the batch-normalization layers local:
each hospital's scanners and populations shift the feature statistics, and
averaging them would fit no site. The study config names the local
parameters in ``strategy.local_layers`` with shell-style patterns
(``fnmatch``, e.g. ``"*.norm*"`` or ``"linear.bias"``), matched against full
state-dict names (see ``medfed.contract.local_layers``).

Round trip at a site::

    store = LocalLayerStore(path)
    weights = merge_global(global_weights, store.load(), patterns)  # load model
    ... train ...
    shared, local = split_state_dict(trained, patterns)
    ... compute and upload the delta of ``shared`` only ...
    store.save(local)                   # once the upload is accepted

Local parameters are never uploaded, so the aggregation service never
receives them. It aggregates the shared tensors and keeps its own copy of the
local ones unchanged.
"""

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from medfed.contract.local_layers import (
    check_local_patterns,
    is_local,
    validate_local_patterns,
)
from medfed.errors import ConfigError
from medfed.sites.tensor_files import load_tensors, save_tensors_atomic

__all__ = [
    "LocalLayerStore",
    "is_local",
    "merge_global",
    "split_state_dict",
    "validate_local_patterns",
]


def split_state_dict(
    state: Mapping[str, np.ndarray], patterns: Iterable[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split ``state`` into the shared part (uploaded) and the local part.

    Raises:
        ConfigError: a pattern matches no parameter, or the patterns match
            every parameter (see ``check_local_patterns``).
    """
    patterns = check_local_patterns(patterns, list(state))
    shared: dict[str, np.ndarray] = {}
    local: dict[str, np.ndarray] = {}
    for name, value in state.items():
        (local if is_local(name, patterns) else shared)[name] = value
    return shared, local


def merge_global(
    global_weights: Mapping[str, np.ndarray],
    local_layers: Mapping[str, np.ndarray] | None,
    patterns: Iterable[str],
) -> dict[str, np.ndarray]:
    """Return the site's full weights: the global model plus its local layers.

    A local layer the site has not stored yet (first round) keeps the value
    from ``global_weights`` (the initial model carries every parameter).

    Raises:
        ConfigError: a stored local layer does not match the local patterns,
            or its shape differs from the global model's tensor of that name.
    """
    patterns = validate_local_patterns(patterns)
    merged = {key: np.asarray(value) for key, value in global_weights.items()}
    for name, value in (local_layers or {}).items():
        if not is_local(name, patterns):
            raise ConfigError(
                f"stored local layer {name!r} matches none of strategy.local_layers "
                f"{list(patterns)}; delete the site's local-layer file if the "
                "study's patterns changed"
            )
        if name in merged and np.shape(merged[name]) != np.shape(value):
            raise ConfigError(
                f"stored local layer {name!r} has shape {list(np.shape(value))}, "
                f"but the global model's has {list(np.shape(merged[name]))}"
            )
        merged[name] = np.asarray(value)
    return merged


class LocalLayerStore:
    """The site's safetensors file of its local layers.

    Args:
        path: where the layers are kept, e.g. inside the site's state folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, np.ndarray] | None:
        """Return the stored local layers, or None before the first round."""
        if not self.path.exists():
            return None
        return load_tensors(self.path)

    def save(self, local_layers: Mapping[str, np.ndarray]) -> None:
        """Replace the stored local layers atomically."""
        save_tensors_atomic(self.path, local_layers)
