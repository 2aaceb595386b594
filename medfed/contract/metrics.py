"""Federated evaluation: the aggregates a site reports and the pooled metrics.

A site reports only aggregates of its test split: the record count, the summed
loss, the number of correct predictions and, per true class, a histogram of
predicted scores over fixed equal-width bins on [0, 1]. No per-patient
prediction leaves the site. Pooled accuracy is exact (from counts); pooled AUC
is computed from the merged histograms, treating scores in the same bin as
ties, so it differs from the exact AUC by at most the share of positive and
negative pairs that fall in one bin.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["EvaluationAggregates", "auc_from_histograms", "pool"]


@dataclass(frozen=True)
class EvaluationAggregates:
    """Aggregate test results of one site (or of several, pooled)."""

    records: int
    loss_sum: float
    correct: int
    negative_histogram: list[int]
    positive_histogram: list[int]

    @property
    def accuracy(self) -> float:
        return self.correct / self.records if self.records else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.records if self.records else float("nan")

    @property
    def auc(self) -> float:
        return auc_from_histograms(self.negative_histogram, self.positive_histogram)

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, labels: np.ndarray, losses: np.ndarray, *, bins: int
    ) -> "EvaluationAggregates":
        """Summarize per-record scores (probabilities), labels and losses."""
        edges = np.linspace(0.0, 1.0, bins + 1)
        negative, _ = np.histogram(scores[labels == 0], bins=edges)
        positive, _ = np.histogram(scores[labels == 1], bins=edges)
        predictions = (scores >= 0.5).astype(labels.dtype)
        return cls(
            records=int(labels.shape[0]),
            loss_sum=float(losses.sum()),
            correct=int((predictions == labels).sum()),
            negative_histogram=[int(count) for count in negative],
            positive_histogram=[int(count) for count in positive],
        )


def auc_from_histograms(negative: Sequence[int], positive: Sequence[int]) -> float:
    """Return ROC AUC from per-class score histograms over the same bins.

    AUC is P(score of a positive > score of a negative) + P(tie) / 2, with a
    tie meaning both fall in the same bin. NaN when a class is absent.
    """
    negative_counts = np.asarray(negative, np.float64)
    positive_counts = np.asarray(positive, np.float64)
    negatives, positives = negative_counts.sum(), positive_counts.sum()
    if negatives == 0 or positives == 0:
        return float("nan")
    negatives_below = np.concatenate(([0.0], np.cumsum(negative_counts)[:-1]))
    wins = (positive_counts * negatives_below).sum() + 0.5 * (
        positive_counts * negative_counts
    ).sum()
    return float(wins / (negatives * positives))


def pool(results: Sequence[EvaluationAggregates]) -> EvaluationAggregates:
    """Merge several sites' aggregates into one."""
    if not results:
        raise ValueError("cannot pool an empty list of evaluation results")
    return EvaluationAggregates(
        records=sum(r.records for r in results),
        loss_sum=sum(r.loss_sum for r in results),
        correct=sum(r.correct for r in results),
        negative_histogram=np.sum(
            [r.negative_histogram for r in results], axis=0
        ).tolist(),
        positive_histogram=np.sum(
            [r.positive_histogram for r in results], axis=0
        ).tolist(),
    )
