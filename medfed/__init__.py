"""medfed: federated learning across hospitals under differential privacy.

Sub-packages by role:

- ``medfed.contract``: what sites and the aggregation service agree on (the
  study config schema, the update wire format, model architectures, identifiers).
- ``medfed.sites``: everything a hospital runs (data, DP training, the ledger).
- ``medfed.aggregation``: the aggregation service and the aggregation math.
- ``medfed.flows``: Prefect flows that orchestrate rounds.
"""

from medfed.errors import MedfedError

__all__ = ["MedfedError", "__version__"]
__version__ = "0.1.0"
