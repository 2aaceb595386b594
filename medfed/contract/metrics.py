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
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "EvaluationAggregates",
    "auc_from_histograms",
    "pool",
    "youden_threshold",
]


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

    def at_threshold(self, threshold: float) -> "EvaluationAggregates":
        """Return these aggregates with ``correct`` counted at ``threshold``.

        A record counts as predicted positive when its score is at least
        ``threshold``. The count comes from the histograms, so it is exact
        only when ``threshold`` is a bin edge, which is checked.

        Raises:
            ValueError: ``threshold`` is not an edge of the histogram bins.
        """
        bins = len(self.negative_histogram)
        edge = round(threshold * bins)
        if not 0 <= edge <= bins or abs(edge / bins - threshold) > 1e-9:
            raise ValueError(
                f"threshold {threshold} is not an edge of the {bins} histogram "
                "bins on [0, 1]; choose a multiple of 1 / bins"
            )
        correct = sum(self.negative_histogram[:edge]) + sum(
            self.positive_histogram[edge:]
        )
        return replace(self, correct=int(correct))

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


def youden_threshold(aggregates: EvaluationAggregates) -> float:
    """Return the bin edge that maximizes Youden's J on these aggregates.

    J is sensitivity + specificity - 1 when records scoring at least the
    threshold are predicted positive. J does not depend on the share of
    positives, so a threshold chosen on sites' validation splits carries over
    to a test set with another prevalence. Among equal J the edge nearest 0.5
    wins; with a class absent the threshold stays 0.5.
    """
    negative = np.asarray(aggregates.negative_histogram, np.float64)
    positive = np.asarray(aggregates.positive_histogram, np.float64)
    bins = len(negative)
    if negative.sum() == 0 or positive.sum() == 0:
        return 0.5
    # Index k stands for the threshold k / bins: bins below it are negative.
    specificity = np.concatenate(([0.0], np.cumsum(negative))) / negative.sum()
    positives_below = np.concatenate(([0.0], np.cumsum(positive)))
    sensitivity = 1.0 - positives_below / positive.sum()
    youden = sensitivity + specificity - 1.0
    edges = np.arange(bins + 1) / bins
    best = np.flatnonzero(youden >= youden.max() - 1e-12)
    return float(edges[best[np.argmin(np.abs(edges[best] - 0.5))]])
