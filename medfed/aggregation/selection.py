"""Choice of the sites that take part in a round.

The choice depends only on the set of eligible sites, their sample counts,
the seed and the round number, so a restarted coordinator picks the same
sites again and a study can be replayed.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

from medfed.aggregation.params import require_float, require_int
from medfed.errors import ConfigError, QuorumError

__all__ = ["select_sites"]


def select_sites(
    sites: Sequence[str],
    sample_counts: Mapping[str, int] | None,
    round_number: int,
    *,
    fraction: float = 1.0,
    minimum: int = 1,
    weighted: bool = False,
    seed: int = 0,
) -> list[str]:
    """Choose the sites of round ``round_number``, without replacement.

    The number chosen is ``max(minimum, ceil(fraction * len(sites)))``, capped
    at ``len(sites)``.

    Args:
        sites: the eligible site ids, without duplicates.
        sample_counts: each site's training-set size; needed when ``weighted``.
        round_number: the round, >= 0.
        fraction: share of the eligible sites to choose, in (0, 1].
        minimum: minimum number of sites to choose, >= 1.
        weighted: choose with probability proportional to sample count
            (successively, without replacement) instead of uniformly.
        seed: the study's selection seed.

    Returns:
        The chosen site ids, sorted.

    Raises:
        ConfigError: an invalid parameter, a duplicate site, or a missing or
            negative sample count.
        QuorumError: fewer eligible sites (with data, when weighted) than
            ``minimum``.
    """
    fraction = require_float(
        "fraction", fraction, minimum=0.0, maximum=1.0, exclusive_minimum=True
    )
    minimum = require_int("minimum", minimum, minimum=1)
    round_number = require_int("round_number", round_number, minimum=0)
    seed = require_int("seed", seed, minimum=0)
    ordered = sorted(sites)
    if len(set(ordered)) != len(ordered):
        duplicates = sorted({site for site in ordered if ordered.count(site) > 1})
        raise ConfigError(f"sites {duplicates} are listed more than once")
    if len(ordered) < minimum:
        raise QuorumError(
            f"round {round_number} needs at least {minimum} sites, but only "
            f"{len(ordered)} are eligible: {ordered}"
        )
    count = min(len(ordered), max(minimum, math.ceil(fraction * len(ordered))))
    rng = np.random.default_rng([seed, round_number])
    if not weighted:
        chosen = rng.choice(len(ordered), size=count, replace=False)
        return sorted(ordered[int(index)] for index in chosen)
    probabilities = _sampling_probabilities(ordered, sample_counts, count)
    chosen = rng.choice(len(ordered), size=count, replace=False, p=probabilities)
    return sorted(ordered[int(index)] for index in chosen)


def _sampling_probabilities(
    sites: list[str], sample_counts: Mapping[str, int] | None, count: int
) -> np.ndarray:
    if sample_counts is None:
        raise ConfigError("weighted site selection needs the sites' sample counts")
    counts = []
    for site in sites:
        if site not in sample_counts:
            raise ConfigError(f"no sample count for site {site!r}")
        counts.append(require_int(f"sample count of {site}", sample_counts[site]))
        if counts[-1] < 0:
            raise ConfigError(
                f"sample count of site {site!r} must be >= 0, got {counts[-1]}"
            )
    with_data = sum(1 for value in counts if value > 0)
    if with_data < count:
        raise QuorumError(
            f"weighted selection needs {count} sites with data, but only "
            f"{with_data} have a positive sample count"
        )
    array = np.asarray(counts, np.float64)
    return array / array.sum()
