"""Extra tensor groups in an upload, and tensors published next to a model.

Some strategies need more from a site than its delta: SCAFFOLD's sites send a
control delta. Those tensors travel inside the same envelope as the delta, so
they pass through the same codec, signature and masking secure aggregation.
In an envelope, tensor ``extra/<group>/<name>`` is tensor ``<name>`` of extras
group ``<group>``; every other tensor belongs to the delta.
``expected_upload_shapes`` rejects a model tensor whose name starts with
``extra/``, so the two cannot collide.

Under masking secure aggregation the service learns only the sum over sites
of ``sample_count * tensor``. Strategies want the unweighted sum of each
extras group, so a masking site divides its extras by its sample count
before masking (``scale_extras_for_masking``); the extras part of the
unmasked sum is then the unweighted sum.

The service publishes a strategy's tensors for sites (SCAFFOLD's server
control variate) as one safetensors file per model version, with tensor
``<group>/<name>`` for each group (``flatten_groups``).
"""

from collections.abc import Collection, Mapping

import numpy as np

from medfed.errors import ConfigError

__all__ = [
    "EXTRA_PREFIX",
    "expected_upload_shapes",
    "flatten_groups",
    "pack_extras",
    "scale_extras_for_masking",
    "split_extras",
    "unflatten_groups",
]

EXTRA_PREFIX = "extra/"

Tensors = Mapping[str, np.ndarray]


def _check_group(group: str) -> None:
    if not group or "/" in group:
        raise ConfigError(
            f"extras group name must be non-empty and contain no '/', got {group!r}"
        )


def pack_extras(delta: Tensors, extras: Mapping[str, Tensors]) -> dict[str, np.ndarray]:
    """Return the envelope's tensors: ``delta`` plus each extras group, prefixed."""
    packed = dict(delta)
    for group, tensors in extras.items():
        _check_group(group)
        for name, value in tensors.items():
            packed[f"{EXTRA_PREFIX}{group}/{name}"] = value
    return packed


def split_extras(
    tensors: Tensors,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Undo ``pack_extras``: return the delta and the extras groups.

    Raises:
        ConfigError: a tensor starts with ``extra/`` but names no group.
    """
    delta: dict[str, np.ndarray] = {}
    extras: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if not name.startswith(EXTRA_PREFIX):
            delta[name] = value
            continue
        group, separator, key = name.removeprefix(EXTRA_PREFIX).partition("/")
        if not group or not separator or not key:
            raise ConfigError(
                f"tensor {name!r} starts with {EXTRA_PREFIX!r} but is not of the "
                f"form '{EXTRA_PREFIX}<group>/<name>'"
            )
        extras.setdefault(group, {})[key] = value
    return delta, extras


def expected_upload_shapes(
    shared_weights: Tensors, groups: Collection[str]
) -> dict[str, tuple[int, ...]]:
    """Return the name and shape of every tensor an upload must carry.

    Args:
        shared_weights: the global model's tensors that sites upload (all of
            them unless the study keeps some layers local).
        groups: the extras groups the study's strategy needs from sites; each
            has one tensor per shared tensor, of the same shape.

    Raises:
        ConfigError: a model tensor's name starts with ``extra/``.
    """
    reserved = sorted(name for name in shared_weights if name.startswith(EXTRA_PREFIX))
    if reserved:
        raise ConfigError(
            f"model tensors {reserved} start with {EXTRA_PREFIX!r}, which is "
            "reserved for extras groups; rename those layers"
        )
    shapes = {name: tuple(np.shape(value)) for name, value in shared_weights.items()}
    for group in groups:
        _check_group(group)
        for name, value in shared_weights.items():
            shapes[f"{EXTRA_PREFIX}{group}/{name}"] = tuple(np.shape(value))
    return shapes


def scale_extras_for_masking(
    extras: Mapping[str, Tensors], sample_count: int
) -> dict[str, dict[str, np.ndarray]]:
    """Divide every extras tensor by ``sample_count``, as float32.

    Masking multiplies the whole upload by the site's sample count, so the
    extras part of the unmasked sum becomes the unweighted sum over sites.
    """
    if sample_count <= 0:
        raise ConfigError(f"sample_count must be positive, got {sample_count}")
    return {
        group: {
            name: (np.asarray(value, np.float64) / sample_count).astype(np.float32)
            for name, value in tensors.items()
        }
        for group, tensors in extras.items()
    }


def flatten_groups(groups: Mapping[str, Tensors]) -> dict[str, np.ndarray]:
    """Return ``{"<group>/<name>": float32 array}`` for a safetensors file."""
    flat: dict[str, np.ndarray] = {}
    for group, tensors in groups.items():
        _check_group(group)
        for name, value in tensors.items():
            flat[f"{group}/{name}"] = np.ascontiguousarray(value, np.float32)
    return flat


def unflatten_groups(flat: Tensors) -> dict[str, dict[str, np.ndarray]]:
    """Undo ``flatten_groups``.

    Raises:
        ConfigError: a tensor name has no ``<group>/`` part.
    """
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        group, separator, name = key.partition("/")
        if not group or not separator or not name:
            raise ConfigError(
                f"published tensor {key!r} is not of the form '<group>/<name>'"
            )
        groups.setdefault(group, {})[name] = value
    return groups
