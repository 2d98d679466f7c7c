"""Calibration and abstention, measured on logits: temperature, ECE, NLL, AUROC, the threshold.

Pure functions of tensors (no model, no data loading) so that each is tested on logits the test
makes. `container.training.trust` runs them on the trained model's outputs.

- Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017): one scalar
  T minimising the NLL of softmax(logits / T) on the validation split. The NLL is convex in 1/T,
  so a golden-section search over 1/T in [0.01, 20] finds it; argmax, hence accuracy, is
  unchanged.
- Expected calibration error over 15 equal-width confidence bins, as in that paper.
- AUROC by the Mann-Whitney statistic (ties count half).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

__all__ = [
    "ECE_BINS",
    "Threshold",
    "auroc",
    "choose_threshold",
    "ece",
    "fit_temperature",
    "nll",
    "reliability",
    "risk_coverage",
]

ECE_BINS = 15
_INVERSE_T = (0.01, 20.0)
_GOLDEN = (math.sqrt(5) - 1) / 2


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    return float(functional.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, iterations: int = 80
) -> float | None:
    """The temperature that minimises the NLL of `labels` (golden-section search over 1/T);
    None when there is no minimum inside the range (no images, or logits that separate the
    labels so well that the NLL keeps falling as T shrinks)."""
    if len(labels) == 0:
        return None
    low, high = _INVERSE_T
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    fa, fb = nll(logits, labels, 1 / a), nll(logits, labels, 1 / b)
    for _ in range(iterations):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - _GOLDEN * (high - low)
            fa = nll(logits, labels, 1 / a)
        else:
            low, a, fa = a, b, fb
            b = low + _GOLDEN * (high - low)
            fb = nll(logits, labels, 1 / b)
    inverse = (low + high) / 2
    found = nll(logits, labels, 1 / inverse)
    # No minimum inside: the search ran to an end, or the NLL is as low at the sharpest end.
    at_edge = not _INVERSE_T[0] * 1.01 < inverse < _INVERSE_T[1] * 0.99
    if at_edge or nll(logits, labels, 1 / _INVERSE_T[1]) <= found + 1e-9:
        return None
    return 1 / inverse


def reliability(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> list[dict[str, Any]]:
    """Per equal-width bin of top probability: its range, count, mean confidence and accuracy."""
    top, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    index = (top.double() * bins).long().clamp(max=bins - 1)
    rows: list[dict[str, Any]] = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "confidence": float(top[members].double().mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return rows


def ece(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted gap between confidence and accuracy."""
    total = len(labels)
    return float(
        sum(
            row["count"] / total * abs(row["accuracy"] - row["confidence"])
            for row in reliability(probabilities, labels, bins)
            if row["count"]
        )
    )


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(a positive scores above a negative), ties half: how well a score separates the two."""
    if len(positive) == 0 or len(negative) == 0:
        return None
    p, n = positive.double()[:, None], negative.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def risk_coverage(
    scores: torch.Tensor, correct: torch.Tensor, points: int = 50
) -> list[dict[str, float]]:
    """Accuracy of the answers given when only the most confident fraction is answered."""
    order = scores.argsort(descending=True)
    hits = correct[order].double().cumsum(0)
    n = len(scores)
    counts = sorted({max(1, round(n * (i + 1) / points)) for i in range(points)})
    return [
        {
            "coverage": k / n,
            "accuracy": float(hits[k - 1]) / k,
            "threshold": float(scores[order[k - 1]]),
        }
        for k in counts
    ]


@dataclass(frozen=True)
class Threshold:
    """The chosen threshold (abstain when the score is below it) and how it was reached."""

    value: float
    rule: str


def _below(scores: torch.Tensor, threshold: float) -> float:
    return float((scores < threshold).double().mean()) if len(scores) else 0.0


def choose_threshold(
    scores: torch.Tensor,
    correct: torch.Tensor,
    *,
    abstain_rate: float,
    accuracy: float | None,
    unknown: torch.Tensor | None,
) -> Threshold:
    """The threshold from the user's target, on validation scores of images of the classes.

    - `accuracy`: the lowest threshold whose answered images reach that accuracy (the most
      answers at that accuracy); when none does, the `abstain_rate` rule.
    - otherwise `abstain_rate`: at most that fraction of the validation images abstain;
      with scores of `unknown` images, the threshold at or below that which best separates them
      (most unknowns caught minus validation images abstained; ties to the lower threshold).
    """
    ordered = scores.double().sort().values
    if accuracy is not None:
        curve = risk_coverage(scores, correct, points=len(scores))
        reaching = [row for row in curve if row["accuracy"] >= accuracy]
        if reaching:
            best = max(reaching, key=lambda row: row["coverage"])
            return Threshold(
                best["threshold"],
                f"the most answers at accuracy >= {accuracy:g} on valid "
                f"(coverage {best['coverage']:.3f})",
            )
    cap = float(ordered[min(int(abstain_rate * len(ordered)), len(ordered) - 1)])
    if abstain_rate <= 0:
        cap = float(ordered[0])
    rule = f"at most {abstain_rate:g} of the valid images abstain"
    if accuracy is not None:
        rule = f"accuracy {accuracy:g} is not reached on valid at any coverage; {rule}"
    if unknown is None or len(unknown) == 0:
        return Threshold(cap, rule)
    candidates: Sequence[float] = sorted(
        {cap, *(float(s) for s in torch.cat([scores, unknown]).double() if float(s) <= cap)}
    )
    best_value, best_gain = cap, -2.0
    for value in candidates:
        gain = _below(unknown, value) - _below(scores, value)
        if gain > best_gain + 1e-12:
            best_value, best_gain = value, gain
    return Threshold(best_value, f"{rule}; lowered to best separate the unknown images")
