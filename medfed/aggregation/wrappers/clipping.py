"""L2 clipping of a whole update, shared by the server and the sites.

The norm is taken over every tensor of the update together (the update seen
as one flat vector), because that is the quantity that bounds one site's
influence on the mean and so the sensitivity that central DP calibrates to.
"""

from collections.abc import Mapping

import numpy as np

from medfed.aggregation.params import require_float

__all__ = ["clip_update", "update_norm"]


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of all tensors of ``update`` taken together."""
    squares = sum(
        float(np.sum(np.square(np.asarray(value, np.float64))))
        for value in update.values()
    )
    return float(np.sqrt(squares))


def clip_update(
    update: Mapping[str, np.ndarray], *, max_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``update`` down to L2 norm at most ``max_norm``.

    An update within the bound (including the zero update) is returned
    unchanged in value, as float64.

    Args:
        update: tensor name to array.
        max_norm: the bound, > 0.

    Returns:
        The clipped update and the norm before clipping.
    """
    bound = require_float("max_norm", max_norm, minimum=0.0, exclusive_minimum=True)
    norm = update_norm(update)
    scale = 1.0 if norm <= bound else bound / norm
    clipped = {
        key: np.asarray(value, np.float64) * scale for key, value in update.items()
    }
    return clipped, norm
