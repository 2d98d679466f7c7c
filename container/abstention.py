"""Calibrated probabilities and the decision to abstain: one definition for `train` and `serve`.

`train` fits a temperature on the validation split, compares the confidence scores below on how
well they separate images of the classes from images of none of them, keeps the best, and sets a
threshold from the target the user stated (container/training/trust.py). The result is a
`Policy`: its numbers are stored in model_meta.json under "abstention", the feature statistics the
`mahalanobis` score needs in feature_stats.pt; `serve` applies it to every image. An artifact
without one (written before calibration existed, or by a stopped job) serves uncalibrated
probabilities and never abstains unless a request or the endpoint sets `min_confidence`.

Scores, each "higher = more sure the image is one of the classes":

- `probability`: the calibrated top probability;
- `margin`: the calibrated top probability minus the second;
- `energy`: logsumexp of the logits (Liu et al., "Energy-based Out-of-distribution Detection",
  2020), which keeps the scale a softmax throws away;
- `mahalanobis`: minus the squared Mahalanobis distance of the pooled features to the nearest
  class mean, with one shared covariance (Lee et al., "A Simple Unified Framework for Detecting
  Out-of-Distribution Samples", 2018): it sees an image unlike every class even when the logits
  happen to favour one;
- `combined`: the sum of the `mahalanobis` and `energy` scores, each standardised by its mean and
  standard deviation on the validation images: the features' distance and the logits' scale,
  which fail on different kinds of unknown images.

With `unknown_output` the network has one more output than classes, trained on the `unknown`
channel as "none of these": it is never a label; when it is the highest, the image abstains.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch

__all__ = [
    "COMBINED",
    "SCORES",
    "SCORE_WORDS",
    "Answer",
    "FeatureGaussian",
    "Outputs",
    "Override",
    "Policy",
    "Score",
    "answer",
    "calibrated",
    "confidence",
    "matched",
    "spread",
]

Score = Literal["probability", "margin", "energy", "mahalanobis", "combined"]
SCORES: tuple[Score, ...] = get_args(Score)

SCORE_WORDS: dict[str, str] = {
    "probability": "calibrated top probability",
    "margin": "margin between the top two probabilities",
    "energy": "energy score (logsumexp of the logits)",
    "mahalanobis": "feature score (minus the Mahalanobis distance to the nearest class)",
    "combined": "combined score (standardised feature and energy scores)",
}
COMBINED: tuple[Score, ...] = ("mahalanobis", "energy")


@dataclass(frozen=True)
class Outputs:
    """What the network gives for a batch: logits (N, outputs) and pooled features (N, D)."""

    logits: torch.Tensor
    features: torch.Tensor


@dataclass(frozen=True)
class FeatureGaussian:
    """Per-class means of the pooled features and the precision of their shared covariance."""

    means: torch.Tensor  # (classes, D)
    precision: torch.Tensor  # (D, D)
    _terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = field(
        init=False, repr=False, compare=False
    )

    @classmethod
    def fit(
        cls, features: torch.Tensor, labels: torch.Tensor, classes: int, shrinkage: float = 0.1
    ) -> FeatureGaussian:
        """Fit on features of images of the classes; the covariance is shrunk toward its mean
        variance so that it inverts with fewer images than dimensions."""
        x = features.double()
        means = torch.stack([x[labels == c].mean(dim=0) for c in range(classes)])
        centred = x - means[labels]
        covariance = centred.T @ centred / max(1, len(x) - classes)
        scale = float(covariance.diagonal().mean())
        # Features that do not vary at all (a model that has learnt nothing yet): unit variance.
        ridge = shrinkage * scale if scale > 1e-12 else 1.0
        covariance = (1 - shrinkage) * covariance + ridge * torch.eye(len(covariance))
        return cls(means.float(), torch.linalg.inv(covariance).float())

    def __post_init__(self) -> None:
        # (x - m) P (x - m) = x P x - 2 x (P m) + m P m: the class terms once, in float64.
        precision, means = self.precision.double(), self.means.double()
        projected = means @ precision
        object.__setattr__(self, "_terms", (precision, projected, (projected * means).sum(dim=1)))

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Minus the squared distance to the nearest class mean, per row."""
        precision, projected, offsets = self._terms
        x = features.double()
        distance = ((x @ precision) * x).sum(dim=1, keepdim=True) - 2 * x @ projected.T + offsets
        return -distance.min(dim=1).values.float()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"means": self.means, "precision": self.precision}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> FeatureGaussian:
        return cls(tensors["means"].float(), tensors["precision"].float())


@dataclass(frozen=True)
class Policy:
    """What an artifact says about its probabilities and when to abstain."""

    temperature: float = 1.0
    score: Score = "probability"
    threshold: float | None = None  # None: the artifact sets no threshold
    unknown_output: bool = False
    # `combined`: the mean and standard deviation of each of its scores on the valid images
    scales: Mapping[str, tuple[float, float]] | None = None
    gaussian: FeatureGaussian | None = None  # what `mahalanobis` needs; not in the JSON

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], gaussian: FeatureGaussian | None = None) -> Policy:
        saved = meta.get("abstention")
        if not saved:
            return cls()
        return cls(
            temperature=float(saved["temperature"]),
            score=saved["score"],
            threshold=None if saved["threshold"] is None else float(saved["threshold"]),
            unknown_output=bool(saved["unknown_output"]),
            scales={k: (float(m), float(sd)) for k, (m, sd) in saved["scales"].items()}
            if saved.get("scales")
            else None,
            gaussian=gaussian,
        )

    def to_meta(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "score": self.score,
            "threshold": self.threshold,
            "unknown_output": self.unknown_output,
            "scales": None if self.scales is None else {k: list(v) for k, v in self.scales.items()},
        }


@dataclass(frozen=True)
class Override:
    """A request's or the endpoint's say: `abstain=off`, or its own `min_confidence` (on the
    calibrated top probability) instead of the artifact's score and threshold."""

    abstain: bool = True
    min_confidence: float | None = None


def calibrated(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of logits / temperature over the last dimension, in float32."""
    return (logits.float() / temperature).softmax(dim=-1)


def confidence(outputs: Outputs, score: Score, policy: Policy) -> torch.Tensor:
    """One score per row; higher is more sure it is one of the classes. With an unknown output,
    the scores read the class outputs only."""
    if score == "combined":
        if policy.scales is None:
            raise ValueError("the combined score needs the artifact's score scales")
        total = torch.zeros(len(outputs.logits))
        for part in COMBINED:
            mean, std = policy.scales[part]
            total += (confidence(outputs, part, policy) - mean) / std
        return total
    if score == "mahalanobis":
        if policy.gaussian is None:
            raise ValueError("the mahalanobis score needs the artifact's feature statistics")
        return policy.gaussian.score(outputs.features)
    logits = outputs.logits.float()
    probabilities = calibrated(logits, policy.temperature)
    if policy.unknown_output:
        logits, probabilities = logits[..., :-1], probabilities[..., :-1]
    if score == "energy":
        return torch.logsumexp(logits, dim=-1)
    top = probabilities.topk(min(2, probabilities.shape[-1]), dim=-1).values
    if score == "probability":
        return top[..., 0]
    second = top[..., 1] if top.shape[-1] > 1 else torch.zeros_like(top[..., 0])
    return top[..., 0] - second


def spread(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation (1 when there is no spread to measure): a `combined` scale."""
    std = float(scores.std()) if len(scores) > 1 else 0.0
    return float(scores.mean()), std if std > 0 else 1.0


def matched(policy: Policy, reference: Outputs, other: Outputs) -> Policy:
    """`policy` for another form of the same network (int8), from both forms' outputs on the
    same images: the combined score's scales measured on `other`'s, and the threshold moved to
    abstain on as many of them as `policy` does on `reference` (the scores rank images alike,
    but quantized features shift the feature distances)."""
    if policy.threshold is None:
        return policy
    scales: dict[str, tuple[float, float]] = {
        part: spread(confidence(other, part, policy)) for part in COMBINED
    }
    moved = replace(policy, scales=scales if policy.scales is not None else None)
    declined = int((confidence(reference, policy.score, policy) < policy.threshold).sum())
    ranked = confidence(other, policy.score, moved).sort().values
    return replace(moved, threshold=float(ranked[min(declined, len(ranked) - 1)]))


@dataclass(frozen=True)
class Answer:
    """One image's answer: probabilities over the classes (calibrated; the unknown output's share
    left out, not spread over the classes), and whether and why it abstains."""

    probabilities: torch.Tensor
    abstained: bool
    reason: str | None


def answer(outputs: Outputs, policy: Policy, override: Override) -> Answer:
    """The answer for one image (`outputs` of a batch of one) under the artifact's policy and an
    override."""
    probabilities = calibrated(outputs.logits[0], policy.temperature)
    classes = probabilities[:-1] if policy.unknown_output else probabilities
    if not override.abstain:
        return Answer(classes, False, None)
    if policy.unknown_output and int(probabilities.argmax()) == len(classes):
        return Answer(
            classes,
            True,
            f"the model's 'none of these' output is highest "
            f"({float(probabilities[-1]):.2f}): not one of its classes",
        )
    if override.min_confidence is not None:
        top = float(classes.max())
        if top < override.min_confidence:
            return Answer(
                classes,
                True,
                f"top probability {top:.3f} is below min_confidence {override.min_confidence:g}",
            )
        return Answer(classes, False, None)
    if policy.threshold is None:
        return Answer(classes, False, None)
    value = float(confidence(outputs, policy.score, policy)[0])
    if value < policy.threshold:
        return Answer(
            classes,
            True,
            f"{SCORE_WORDS[policy.score]} {value:.3f} is below {policy.threshold:.3f}, the "
            "threshold set at training: probably none of the classes",
        )
    return Answer(classes, False, None)
