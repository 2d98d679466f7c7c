"""Temperature, ECE, AUROC and the threshold rules, on logits the tests make."""

from __future__ import annotations

import pytest
import torch

from container.abstention import (
    FeatureGaussian,
    Outputs,
    Override,
    Policy,
    answer,
    calibrated,
    confidence,
)
from container.training.calibration import (
    auroc,
    choose_threshold,
    ece,
    fit_temperature,
    nll,
    reliability,
    risk_coverage,
)


def _calibrated_sample(n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Logits and labels drawn from softmax(logits): calibrated by construction (T = 1)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).flatten()
    return logits, labels


def test_logits_scaled_by_ten_are_brought_back() -> None:
    logits, labels = _calibrated_sample()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(logits * 10, labels) == pytest.approx(10.0, rel=0.1)


def test_perfectly_separated_labels_have_no_temperature() -> None:
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]] * 10)
    labels = torch.tensor([0, 1] * 10)
    assert fit_temperature(logits, labels) is None  # NLL falls all the way to T -> 0


def test_temperature_keeps_argmax_and_lowers_nll() -> None:
    logits, labels = _calibrated_sample(seed=1)
    overconfident = logits * 4
    temperature = fit_temperature(overconfident, labels)
    assert temperature is not None
    assert temperature > 1
    assert torch.equal(
        calibrated(overconfident, temperature).argmax(dim=1), overconfident.argmax(dim=1)
    )
    assert nll(overconfident, labels, temperature) < nll(overconfident, labels)
    before = ece(calibrated(overconfident, 1.0), labels)
    assert ece(calibrated(overconfident, temperature), labels) < before / 2


def test_ece_is_the_weighted_gap_of_the_reliability_bins() -> None:
    # Two bins used: confidence 0.95 (4 images, 2 right) and 0.55 (2 images, both right).
    probabilities = torch.tensor([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 2)
    labels = torch.tensor([0, 0, 1, 1, 0, 0])
    rows = [r for r in reliability(probabilities, labels) if r["count"]]
    assert [(r["count"], r["accuracy"]) for r in rows] == [(2, 1.0), (4, 0.5)]
    expected = 4 / 6 * abs(0.5 - 0.95) + 2 / 6 * abs(1.0 - 0.55)
    assert ece(probabilities, labels) == pytest.approx(expected)


def test_auroc_counts_pairs_and_ties() -> None:
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([2.0, 0.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([1.0]), torch.tensor([])) is None


def test_risk_coverage_answers_the_most_confident_first() -> None:
    scores = torch.tensor([0.9, 0.8, 0.3, 0.2])
    correct = torch.tensor([True, True, False, True])
    curve = risk_coverage(scores, correct, points=4)
    assert [(r["coverage"], r["accuracy"]) for r in curve] == [
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, pytest.approx(2 / 3)),
        (1.0, 0.75),
    ]


def test_threshold_from_the_abstain_rate() -> None:
    scores = torch.arange(100, dtype=torch.float64)  # 0 .. 99
    correct = torch.ones(100, dtype=torch.bool)
    chosen = choose_threshold(scores, correct, abstain_rate=0.05, accuracy=None, unknown=None)
    assert float((scores < chosen.value).double().mean()) == 0.05
    none = choose_threshold(scores, correct, abstain_rate=0.0, accuracy=None, unknown=None)
    assert float((scores < none.value).double().mean()) == 0.0


def test_threshold_from_an_accuracy_target() -> None:
    scores = torch.arange(10, dtype=torch.float64)
    correct = torch.tensor([False, False, True, False, True, True, True, True, True, True])
    chosen = choose_threshold(scores, correct, abstain_rate=0.05, accuracy=1.0, unknown=None)
    assert chosen.value == 4.0  # answers 4..9, all right: the most answers at 100 %
    unreachable = torch.zeros(10, dtype=torch.bool)
    fallback = choose_threshold(scores, unreachable, abstain_rate=0.2, accuracy=0.9, unknown=None)
    assert fallback.value == 2.0
    assert "not reached" in fallback.rule


def test_unknown_images_lower_the_threshold_to_where_they_separate() -> None:
    scores = torch.arange(10, 110, dtype=torch.float64)  # valid: 10 .. 109
    correct = torch.ones(100, dtype=torch.bool)
    unknown = torch.arange(0, 5, dtype=torch.float64)  # all far below
    alone = choose_threshold(scores, correct, abstain_rate=0.05, accuracy=None, unknown=None)
    joint = choose_threshold(scores, correct, abstain_rate=0.05, accuracy=None, unknown=unknown)
    assert joint.value < alone.value
    assert float((unknown < joint.value).double().mean()) == 1.0
    assert float((scores < joint.value).double().mean()) == 0.0


def _outputs(logits: list[float], features: list[float] | None = None) -> Outputs:
    return Outputs(torch.tensor([logits]), torch.tensor([features or [0.0, 0.0]]))


def test_scores_rank_confident_rows_higher() -> None:
    sure, unsure = [8.0, 0.0, 0.0], [1.0, 0.9, 0.8]
    logits = torch.tensor([sure, unsure])
    # Features: the first row at a class mean, the second far from both.
    features = torch.tensor([[1.0, 0.0], [-5.0, 5.0]])
    gaussian = FeatureGaussian.fit(
        torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.1], [0.0, 0.9]]),
        torch.tensor([0, 0, 1, 1]),
        classes=2,
    )
    policy = Policy(gaussian=gaussian)
    for score in ("probability", "margin", "energy", "mahalanobis"):
        values = confidence(Outputs(logits, features), score, policy)
        assert values[0] > values[1], score


def test_the_gaussian_fits_features_that_do_not_vary() -> None:
    """Two images per class whose pooled features are all zero: a tiny job's early model."""
    gaussian = FeatureGaussian.fit(torch.zeros(4, 8), torch.tensor([0, 0, 1, 1]), classes=2)
    assert torch.equal(gaussian.score(torch.zeros(1, 8)), torch.zeros(1))
    assert float(gaussian.score(torch.ones(1, 8))) == pytest.approx(-8.0)


def test_the_gaussian_score_is_minus_the_distance_to_the_nearest_mean() -> None:
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    gaussian = FeatureGaussian(means, torch.eye(2) / 4)  # variance 4 in each direction
    scores = gaussian.score(torch.tensor([[2.0, 0.0], [10.0, 4.0]]))
    torch.testing.assert_close(scores, torch.tensor([-1.0, -4.0]))


def test_answer_follows_policy_and_overrides() -> None:
    logits = _outputs([2.0, 1.5, 0.0])
    top = float(calibrated(logits.logits, 1.0).max())
    policy = Policy(temperature=1.0, score="probability", threshold=top + 0.01)
    assert answer(logits, policy, Override()).abstained
    assert not answer(logits, policy, Override(abstain=False)).abstained
    assert not answer(logits, policy, Override(min_confidence=top - 0.01)).abstained
    assert answer(logits, Policy(), Override(min_confidence=top + 0.01)).abstained
    assert not answer(logits, Policy(), Override()).abstained  # an artifact without a policy

    unknown_wins = _outputs([0.0, 0.5, 3.0])  # the last output is "none of these"
    with_unknown = Policy(unknown_output=True, threshold=0.0)
    result = answer(unknown_wins, with_unknown, Override())
    assert result.abstained
    assert "none of these" in (result.reason or "")
    assert result.probabilities.shape == (2,)  # never offered as a label
    assert not answer(unknown_wins, with_unknown, Override(abstain=False)).abstained
