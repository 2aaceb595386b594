"""MLflow "model from code" for medfed global models.

MLflow loads this file instead of unpickling a Python object: the model is
rebuilt from its architecture name and parameters, and its weights are read
from a safetensors artifact, so loading a registered medfed model never runs
pickle.
"""

import json

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext
from safetensors.numpy import load_file


class GlobalModel(PythonModel):
    """Scores records with a medfed global model; returns probabilities."""

    def load_context(self, context: PythonModelContext) -> None:
        from medfed.contract.models import build_model

        with open(context.artifacts["spec"], encoding="utf-8") as handle:
            spec = json.load(handle)
        self.model = build_model(spec["name"], **spec["params"])
        weights = load_file(context.artifacts["weights"])
        self.model.load_state_dict(
            {key: torch.from_numpy(value) for key, value in weights.items()}
        )
        self.model.eval()

    # MLflow derives no schema from an ndarray hint, and without any hint it
    # warns on every load.
    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, object] | None = None,
    ) -> np.ndarray:
        inputs = torch.as_tensor(np.asarray(model_input, np.float32))
        with torch.no_grad():
            return torch.sigmoid(self.model(inputs)).numpy()


mlflow.models.set_model(GlobalModel())
