"""FedProx: FedAvg on the server, a proximal term at the sites (Li et al., 2020).

Sites add ``mu / 2 * ||w - w_global||^2`` to their local loss, which keeps
heterogeneous sites from drifting far from the global model within a round.
The server only averages; it publishes ``mu`` through ``site_settings`` so
every site uses the study's value (see ``medfed.sites.regularizers``).
"""

from medfed.aggregation.params import require_float
from medfed.aggregation.strategies.base import register_strategy
from medfed.aggregation.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


@register_strategy
class FedProx(FedAvg):
    """FedAvg whose sites train with a proximal term of strength ``mu``.

    Args:
        mu: proximal strength, >= 0; 0 makes the sites' loss plain.
        server_learning_rate: scale of the mean delta, > 0.
    """

    name = "fedprox"

    def __init__(self, *, mu: float = 0.01, server_learning_rate: float = 1.0) -> None:
        super().__init__(server_learning_rate=server_learning_rate)
        self.mu = require_float("mu", mu, minimum=0.0)

    def site_settings(self) -> dict[str, float]:
        return {"proximal_mu": self.mu}
