"""SCAFFOLD: control variates against client drift (Karimireddy et al., 2020).

The server keeps a control variate ``c`` (one array per parameter, the same
shapes as the model) and publishes it next to the global model (the
aggregation service serves it per model version, see
``medfed.contract.extras``). Each site keeps its own ``c_i``, corrects every
local gradient step by ``c - c_i`` and sends ``control_delta = c_i_new - c_i``
in the same envelope as its delta, which the service hands over as
``SiteUpdate.extras`` (see ``medfed.sites.scaffold``). The server then sets::

    x = x + server_learning_rate * weighted_mean(delta)
    c = c + (participating sites / total_sites) * mean(control_delta)

Only the mean of the control deltas is needed, so they can travel through the
same codec and secure aggregation as the deltas.
"""

from collections.abc import Mapping

import numpy as np

from medfed.aggregation.params import (
    require_float,
    require_int,
    require_matching_tensors,
)
from medfed.aggregation.strategies.base import (
    Strategy,
    UpdateSum,
    Weights,
    register_strategy,
)
from medfed.aggregation.strategies.fedavg import server_step
from medfed.aggregation.strategies.server_optimizer import load_prefixed_state
from medfed.errors import AggregationError

__all__ = ["CONTROL_DELTA", "CONTROL_VARIATE", "Scaffold"]

#: Extras group in which sites send ``c_i_new - c_i``.
CONTROL_DELTA = "control_delta"
#: Published tensor group holding the server control variate ``c``.
CONTROL_VARIATE = "control_variate"

_CONTROL = "control/"


@register_strategy
class Scaffold(Strategy):
    """SCAFFOLD's server side.

    Args:
        total_sites: number of sites in the study (N), >= 1; a round's
            participating fraction scales the control-variate step.
        server_learning_rate: scale of the mean delta, > 0.
    """

    name = "scaffold"

    def __init__(self, *, total_sites: int, server_learning_rate: float = 1.0) -> None:
        self.total_sites = require_int("total_sites", total_sites, minimum=1)
        self.server_learning_rate = require_float(
            "server_learning_rate",
            server_learning_rate,
            minimum=0.0,
            exclusive_minimum=True,
        )
        self._control: dict[str, np.ndarray] = {}

    @property
    def site_extras(self) -> tuple[str, ...]:
        return (CONTROL_DELTA,)

    def aggregate_sum(
        self, global_weights: Mapping[str, np.ndarray], summed: UpdateSum
    ) -> Weights:
        if summed.site_count > self.total_sites:
            raise AggregationError(
                f"{summed.site_count} sites sent updates, but scaffold was configured "
                f"with total_sites={self.total_sites}"
            )
        mean_control_delta = summed.mean_extras(CONTROL_DELTA)
        require_matching_tensors(
            global_weights, mean_control_delta, what="mean control delta"
        )
        result = self.apply(global_weights, summed.mean_delta())
        fraction = summed.site_count / self.total_sites
        control = self.control_variate(global_weights)
        self._control = {
            key: np.asarray(value, np.float64) + fraction * mean_control_delta[key]
            for key, value in control.items()
        }
        return result

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        mean_delta: Mapping[str, np.ndarray],
    ) -> Weights:
        return server_step(global_weights, mean_delta, self.server_learning_rate)

    def control_variate(self, global_weights: Mapping[str, np.ndarray]) -> Weights:
        """Return ``c`` as float32, zeros of the model's shapes before round one."""
        return {
            key: self._control.get(key, np.zeros(np.shape(value))).astype(np.float32)
            for key, value in global_weights.items()
        }

    def published_tensors(self) -> dict[str, Weights]:
        # Before the first round c is zero everywhere; a site that receives no
        # control variate treats it as zeros of the model's shapes.
        return {
            CONTROL_VARIATE: {
                key: value.astype(np.float32) for key, value in self._control.items()
            }
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        return {_CONTROL + key: value.copy() for key, value in self._control.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        (self._control,) = load_prefixed_state(self.name, state, (_CONTROL,))
