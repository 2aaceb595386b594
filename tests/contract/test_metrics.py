import numpy as np
import pytest

from medfed.contract.metrics import EvaluationAggregates, youden_threshold


def aggregates(negative: list[int], positive: list[int]) -> EvaluationAggregates:
    return EvaluationAggregates(
        records=sum(negative) + sum(positive),
        loss_sum=0.0,
        correct=0,
        negative_histogram=negative,
        positive_histogram=positive,
    )


def test_youden_threshold_by_hand() -> None:
    # Four bins with edges 0, 0.25, 0.5, 0.75, 1. Negatives fill the first
    # two bins, positives the second and third. At 0.5: sensitivity 6/8,
    # specificity 10/10, J = 0.75. At 0.25: 8/8 and 4/10, J = 0.4.
    result = aggregates(negative=[4, 6, 0, 0], positive=[0, 2, 6, 0])

    assert youden_threshold(result) == 0.5


def test_youden_threshold_moves_below_half() -> None:
    # Scores are shifted low: every positive lies in [0.25, 0.5).
    result = aggregates(negative=[5, 0, 0, 0], positive=[0, 5, 0, 0])

    assert youden_threshold(result) == 0.25


def test_youden_threshold_without_a_class() -> None:
    assert youden_threshold(aggregates([3, 0, 0, 0], [0, 0, 0, 0])) == 0.5


def test_accuracy_at_threshold_matches_scores() -> None:
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 2, size=500)
    scores = np.clip(0.3 * labels + generator.random(500) * 0.7, 0.0, 1.0)
    summary = EvaluationAggregates.from_scores(scores, labels, np.zeros(500), bins=200)

    for threshold in (0.0, 0.25, 0.5, 0.62, 1.0):
        expected = int(((scores >= threshold) == labels).sum())
        assert summary.at_threshold(threshold).correct == expected


def test_at_threshold_keeps_count_at_half() -> None:
    generator = np.random.default_rng(1)
    labels = generator.integers(0, 2, size=100)
    summary = EvaluationAggregates.from_scores(
        generator.random(100), labels, np.zeros(100), bins=200
    )

    assert summary.at_threshold(0.5).correct == summary.correct


def test_at_threshold_rejects_non_edge() -> None:
    with pytest.raises(ValueError, match=r"threshold 0.3 is not an edge of the 4"):
        aggregates([1, 0, 0, 0], [0, 0, 0, 1]).at_threshold(0.3)
