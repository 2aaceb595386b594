"""Personalized layers kept at each site (FedBN and similar).

FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021) keeps the batch-normalization layers local:
each hospital's scanners and populations shift the feature statistics, and
averaging them would fit no site. The study config names the local
parameters with shell-style patterns (``fnmatch``, e.g. ``"*.bn*.*"`` or
``"norm.*"``), matched against full state-dict names.

Round trip at a site::

    store = LocalLayerStore(path)
    weights = merge_global(global_weights, store.load(), patterns)  # load model
    ... train ...
    shared, local = split_state_dict(trained, patterns)
    ... compute and upload the delta of ``shared`` only ...
    store.save(local)

Local parameters are never uploaded, so the aggregation service never
receives them: every strategy aggregates exactly the tensors of the global model.
"""

import fnmatch
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from medfed.errors import ConfigError
from medfed.sites.tensor_files import load_tensors, save_tensors_atomic

__all__ = [
    "LocalLayerStore",
    "is_local",
    "merge_global",
    "split_state_dict",
    "validate_local_patterns",
]


def validate_local_patterns(patterns: object) -> tuple[str, ...]:
    """Return ``patterns`` as a tuple of non-empty strings.

    Raises:
        ConfigError: ``patterns`` is not a list of non-empty strings.
    """
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise ConfigError(
            f"local_parameters must be a list of name patterns, got {patterns!r}"
        )
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(
                f"local_parameters entries must be non-empty strings, got {pattern!r}"
            )
        checked.append(pattern)
    return tuple(checked)


def is_local(name: str, patterns: Iterable[str]) -> bool:
    """Return whether parameter ``name`` matches one of the local patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def split_state_dict(
    state: Mapping[str, np.ndarray], patterns: Iterable[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split ``state`` into the shared part (uploaded) and the local part.

    Raises:
        ConfigError: a pattern matches no parameter (most likely a typo, which
            would otherwise silently share the layer it meant to keep).
    """
    patterns = validate_local_patterns(patterns)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in state):
            raise ConfigError(
                f"local_parameters pattern {pattern!r} matches no parameter of "
                f"the model; names look like {sorted(state)[:5]}"
            )
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
                f"stored local layer {name!r} matches none of local_parameters "
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
