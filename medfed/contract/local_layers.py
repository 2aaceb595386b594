"""The model tensors a study keeps local at each site (FedBN and similar).

A study config lists shell-style patterns (``fnmatch``, case-sensitive) in
``strategy.local_layers``, matched against full state-dict names such as
``"norm1.weight"`` or ``"stage2.*.norm*"``. Tensors that match stay at each
site: sites never upload them, and the aggregation service keeps its own
copy of them unchanged. The config loader, the service and the sites use the
same rules from this module.
"""

import fnmatch
from collections.abc import Collection, Iterable

from medfed.errors import ConfigError

__all__ = ["check_local_patterns", "is_local", "validate_local_patterns"]


def validate_local_patterns(patterns: object) -> tuple[str, ...]:
    """Return ``patterns`` as a tuple of non-empty strings.

    Raises:
        ConfigError: ``patterns`` is not a list of non-empty strings.
    """
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise ConfigError(
            f"strategy.local_layers must be a list of name patterns, got {patterns!r}"
        )
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(
                "strategy.local_layers entries must be non-empty strings, "
                f"got {pattern!r}"
            )
        checked.append(pattern)
    return tuple(checked)


def is_local(name: str, patterns: Iterable[str]) -> bool:
    """Return whether tensor ``name`` matches one of the local patterns."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_local_patterns(
    patterns: object, names: Collection[str], *, model: str = "the model"
) -> tuple[str, ...]:
    """Check the patterns against a model's tensor names; return them as a tuple.

    Raises:
        ConfigError: a pattern matches no tensor (most likely a typo, which
            would otherwise silently share the layer it meant to keep), or
            the patterns match every tensor, leaving nothing to aggregate.
    """
    checked = validate_local_patterns(patterns)
    for pattern in checked:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(
                f"strategy.local_layers pattern {pattern!r} matches no parameter "
                f"of {model}; its parameters are {_preview(names)}"
            )
    if checked and all(is_local(name, checked) for name in names):
        raise ConfigError(
            f"strategy.local_layers {list(checked)} match every parameter of "
            f"{model}, so the sites would share nothing; keep fewer layers local"
        )
    return checked


def _preview(names: Collection[str], limit: int = 12) -> str:
    ordered = sorted(names)
    listed = ", ".join(ordered[:limit])
    more = len(ordered) - limit
    return f"[{listed}{f', and {more} more' if more > 0 else ''}]"
