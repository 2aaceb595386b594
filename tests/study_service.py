"""Create a study on a running aggregation service the way the flow does."""

import json

from medfed.contract.config import StudyConfig
from medfed.sites.client import AggregationClient
from medfed.sites.runner import initial_model_weights, weights_to_safetensors


def create_study(client: AggregationClient, config: StudyConfig) -> None:
    """Register ``config``'s study with its initial model and strategy settings."""
    settings = {
        "sites": [site.id for site in config.sites],
        "strategy": config.strategy.name,
        "strategy_params": config.strategy.params,
        "local_layers": config.strategy.local_layers,
    }
    if config.secure_aggregation.mode != "none":
        settings["secure_aggregation"] = config.secure_aggregation.model_dump(
            mode="json"
        )
    client.create_study(
        config.study,
        weights_to_safetensors(
            initial_model_weights(config),
            metadata={"medfed_study_settings": json.dumps(settings)},
        ),
    )
