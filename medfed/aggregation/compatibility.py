"""Config-time checks and assembly of a study's strategy and wrappers.

A study names one strategy and an ordered list of wrappers. The wrappers
receive the updates in the order listed, so the first listed is the outermost
object.
``check_strategy_compatibility`` rejects, before any round runs, combinations
that could not aggregate or would silently weaken a guarantee:

- a robust rule (median, trimmed_mean, krum, multi_krum) under secure
  aggregation, which reveals only the sum of the updates;
- more than one rule that combines the updates itself (a robust rule or
  central_dp), or such a rule listed before another wrapper;
- central_dp with scaffold, whose control deltas would be released without
  clipping or noise;
- a wrapper listed twice.
"""

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

# Importing the packages' modules registers the built-in strategies and wrappers.
from medfed.aggregation.strategies.base import STRATEGIES, Strategy, get_strategy
from medfed.aggregation.wrappers.base import WRAPPERS, get_wrapper
from medfed.errors import ConfigError

__all__ = [
    "NO_SECURE_AGGREGATION",
    "SITE_SIDE_MISSING",
    "SITE_SIDE_MISSING_UNDER_MASKING",
    "build_strategy",
    "build_study_strategy",
    "check_strategy_compatibility",
]

#: The ``secure_aggregation`` value under which the service receives each update.
#: Every other mode reveals only the sum of the updates.
NO_SECURE_AGGREGATION = "none"

_CLIPPING_ALTERNATIVES = "use norm_bound or central_dp instead"

#: Strategies whose site-side part the site runner does not perform yet, with
#: what is missing. Studies naming them are rejected rather than run wrongly.
#: Every registered strategy runs in studies today, so it is empty.
SITE_SIDE_MISSING: dict[str, str] = {}


def check_strategy_compatibility(
    strategy: str, wrappers: Sequence[str], secure_aggregation: str
) -> None:
    """Reject a strategy, wrapper list and secure-aggregation mode that conflict.

    Args:
        strategy: registered strategy name, e.g. ``"fedadam"``.
        wrappers: registered wrapper names in the order they see the updates.
        secure_aggregation: ``"none"``, or the name of a mode that reveals only
            the sum of the updates.

    Raises:
        ConfigError: an unknown name, or a conflict; the message gives the
            reason and what to change.
    """
    if not isinstance(secure_aggregation, str) or not secure_aggregation:
        raise ConfigError(
            "secure_aggregation must be 'none' or the name of a secure-aggregation "
            f"mode, got {secure_aggregation!r}"
        )
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"unknown strategy {strategy!r}: choose one of "
            f"{', '.join(sorted(STRATEGIES))}"
        )
    seen: set[str] = set()
    for name in wrappers:
        if name not in WRAPPERS:
            raise ConfigError(
                f"unknown wrapper {name!r}: choose one of {', '.join(sorted(WRAPPERS))}"
            )
        if name in seen:
            raise ConfigError(f"wrapper {name!r} is listed twice; list it once")
        seen.add(name)

    combining = [name for name in wrappers if WRAPPERS[name].combines_updates]
    if len(combining) > 1:
        raise ConfigError(
            f"wrappers {combining} each combine the updates themselves, so only "
            "one of them can run; keep one"
        )
    if combining and wrappers[-1] != combining[0]:
        raise ConfigError(
            f"wrapper {combining[0]!r} combines the updates, so the wrappers "
            f"listed after it ({list(wrappers[wrappers.index(combining[0]) + 1 :])}) "
            "would never see them; list it last"
        )
    if "central_dp" in seen and strategy == "scaffold":
        raise ConfigError(
            "central_dp cannot wrap scaffold: the sites' control deltas would be "
            "released without clipping or noise; use fedavg, fedprox or a "
            "server optimizer with central_dp"
        )
    if secure_aggregation != NO_SECURE_AGGREGATION:
        for name in wrappers:
            if WRAPPERS[name].needs_individual_updates:
                raise ConfigError(
                    f"{name} needs each site's update, but {secure_aggregation} "
                    "secure aggregation reveals only the sum; "
                    f"{_CLIPPING_ALTERNATIVES}, or set secure_aggregation: none"
                )


def build_strategy(
    strategy: str,
    params: Mapping[str, Any] | None = None,
    wrappers: Sequence[tuple[str, Mapping[str, Any]]] = (),
    *,
    secure_aggregation: str = NO_SECURE_AGGREGATION,
) -> Strategy:
    """Check the combination, then build the strategy inside its wrappers.

    Args:
        strategy: registered strategy name.
        params: the strategy's hyperparameters.
        wrappers: ``(name, params)`` pairs in the order they see the updates.
        secure_aggregation: as for ``check_strategy_compatibility``.

    Raises:
        ConfigError: a conflict, an unknown name or an invalid parameter.
    """
    check_strategy_compatibility(
        strategy, [name for name, _ in wrappers], secure_aggregation
    )
    built = get_strategy(strategy, params)
    for name, wrapper_params in reversed(wrappers):
        built = get_wrapper(name, built, wrapper_params)
    return built


#: Wrappers whose site-side part a study under masking secure aggregation
#: needs and the site runner does not perform yet.
SITE_SIDE_MISSING_UNDER_MASKING = {
    "norm_bound": (
        "the site runner does not yet clip its delta to the published clip_norm "
        "before masking, so the bound would not hold"
    ),
    "central_dp": (
        "the site runner does not yet clip its delta and send it unweighted "
        "before masking, so the noise would not match the sensitivity"
    ),
}


def build_study_strategy(
    settings: Mapping[str, Any],
    *,
    secure_aggregation: str = NO_SECURE_AGGREGATION,
) -> Strategy:
    """Build a study's strategy from its stored settings.

    Args:
        settings: ``{"strategy": name, "strategy_params": {...}, "wrappers":
            [[name, params], ...], "total_sites": n}``; ``wrappers`` and
            ``total_sites`` are optional. ``total_sites`` fills the parameter
            of that name where the strategy or a wrapper takes it and the
            settings leave it out.
        secure_aggregation: as for ``check_strategy_compatibility``.

    Raises:
        ConfigError: malformed settings, a conflict, an unknown name, an
            invalid parameter, or a strategy whose site side is missing.
    """
    try:
        strategy = str(settings["strategy"])
        params = dict(settings.get("strategy_params") or {})
        wrappers = [
            (str(name), dict(p or {})) for name, p in settings.get("wrappers") or []
        ]
        total_sites = settings.get("total_sites")
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"malformed strategy settings: {error!r}") from None
    if strategy in SITE_SIDE_MISSING:
        raise ConfigError(
            f"strategy {strategy!r} cannot run in a study yet: "
            f"{SITE_SIDE_MISSING[strategy]}"
        )
    if secure_aggregation != NO_SECURE_AGGREGATION:
        check_strategy_compatibility(
            strategy, [name for name, _ in wrappers], secure_aggregation
        )
        for name, _ in wrappers:
            if name in SITE_SIDE_MISSING_UNDER_MASKING:
                raise ConfigError(
                    f"wrapper {name!r} cannot run with {secure_aggregation} secure "
                    f"aggregation yet: {SITE_SIDE_MISSING_UNDER_MASKING[name]}; "
                    "set secure_aggregation: none to use it"
                )
    if total_sites is not None:
        params = _with_total_sites(STRATEGIES.get(strategy), params, total_sites)
        wrappers = [
            (name, _with_total_sites(WRAPPERS.get(name), p, total_sites))
            for name, p in wrappers
        ]
    return build_strategy(
        strategy, params, wrappers, secure_aggregation=secure_aggregation
    )


def _with_total_sites(
    cls: type | None, params: dict[str, Any], total_sites: object
) -> dict[str, Any]:
    if cls is None or "total_sites" in params:
        return params
    if "total_sites" not in inspect.signature(cls).parameters:
        return params
    return {**params, "total_sites": total_sites}
