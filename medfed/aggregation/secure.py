"""Apply a strategy to what secure aggregation releases: the weighted sum.

Secure aggregation (``medfed.contract.secagg``) gives the service the
survivors' sample-weighted sum and their total sample count, never an
individual update. Strategies that need only the weighted mean work
unchanged through ``Strategy.apply``; those that must see each update are
rejected here.
"""

from collections.abc import Mapping

import numpy as np

from medfed.aggregation.strategies.base import Strategy, UpdateSum, Weights
from medfed.contract.extras import split_extras
from medfed.contract.secagg.layout import VectorLayout
from medfed.errors import AggregationError, ConfigError

__all__ = ["apply_weighted_sum", "mean_delta_from_sum"]


def mean_delta_from_sum(
    weighted_sum: np.ndarray, sample_count: int, layout: VectorLayout
) -> Weights:
    """Divide a flat weighted sum by ``sample_count`` and split it into tensors.

    Args:
        weighted_sum: float vector in ``layout`` order, shape ``(layout.length,)``.
        sample_count: the total sample count of the sites in the sum.
        layout: the model's tensor layout.

    Returns:
        The sample-weighted mean delta, float32 per tensor.

    Raises:
        AggregationError: the sample count is not positive.
    """
    if sample_count <= 0:
        raise AggregationError(
            f"total sample_count of the securely aggregated sites is {sample_count}; "
            "it must be positive"
        )
    mean = np.asarray(weighted_sum, np.float64) / sample_count
    return {
        name: tensor.astype(np.float32) for name, tensor in layout.split(mean).items()
    }


def apply_weighted_sum(
    strategy: Strategy,
    global_weights: Mapping[str, np.ndarray],
    weighted_sum: np.ndarray,
    sample_count: int,
    *,
    site_count: int,
    layout: VectorLayout | None = None,
) -> Weights:
    """Return the next global weights from a securely aggregated weighted sum.

    The sum goes to ``Strategy.aggregate_sum``, so strategies and wrappers that
    act on sums (server optimizers, central DP noise) see it as they would
    see the sum of individual updates.

    Args:
        layout: the layout of the masked uploads, when they carry extras
            groups (``medfed.contract.extras``) besides the delta of
            ``global_weights``. Sites divide their extras by their sample
            count before masking, so the extras part of the sum is already
            the unweighted sum that ``UpdateSum.extras`` holds. When None, the
            sum is the delta of ``global_weights`` alone.

    Raises:
        ConfigError: the strategy needs individual updates, which secure
            aggregation never releases.
        AggregationError: the sample count is not positive.
    """
    if strategy.needs_individual_updates:
        raise ConfigError(
            f"strategy {strategy.name!r} needs each site's update, which secure "
            "aggregation does not release; choose a strategy that uses only the "
            "weighted mean, or secure_aggregation 'none'"
        )
    if sample_count <= 0:
        raise AggregationError(
            f"total sample_count of the securely aggregated sites is {sample_count}; "
            "it must be positive"
        )
    if layout is None:
        layout = VectorLayout.of(global_weights)
    tensors = layout.split(np.asarray(weighted_sum, np.float64))
    try:
        delta, extras = split_extras(tensors)
    except ConfigError as error:
        raise AggregationError(str(error)) from None
    summed = UpdateSum(
        delta=delta,
        weight_total=float(sample_count),
        site_count=site_count,
        extras=extras,
    )
    return strategy.aggregate_sum(global_weights, summed)
