"""Logistic regression, the model of the heart-disease benchmark."""

import torch
from torch import nn

from medfed.contract.models import check_positive_int, register_model

__all__ = ["LogisticRegression"]


@register_model("logistic_regression")
class LogisticRegression(nn.Module):
    """One linear layer producing a logit for the positive class.

    Args:
        in_features: number of input features.
    """

    def __init__(self, *, in_features: int) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        self.linear = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (batch,) for inputs of shape (batch, in_features)."""
        return self.linear(features).squeeze(-1)
