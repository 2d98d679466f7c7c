"""After the best model is chosen (rank 0): calibrate it, pick the abstention score and threshold.

Reads the logits `evaluate_best` kept for valid (and test), and runs the model on images of none
of the classes: the held-out part of the `unknown` channel when there is one, and always a floor
of synthetic negatives made from the validation images (noise, solid colours, heavy blur), which
are not a substitute for real unknowns and the report says so. The score that separates valid
images from the negatives best (AUROC; the unknown channel's when given) is the one kept. The
result is the artifact's `Policy` and the report's "calibration" and "abstention" sections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import functional as tvf

from container.abstention import (
    COMBINED,
    SCORES,
    FeatureGaussian,
    Outputs,
    Policy,
    Score,
    calibrated,
    confidence,
    spread,
)
from container.images import normalize
from container.training.calibration import (
    auroc,
    choose_threshold,
    ece,
    fit_temperature,
    nll,
    reliability,
    risk_coverage,
)
from container.training.data import ImageFolderDataset, balanced
from container.training.distributed import Rank
from container.training.epochs import loading
from container.training.loader import Batch, eval_batches
from container.training.loop import EvalResult, outputs
from container.training.state import Parts

__all__ = [
    "GAUSSIAN_IMAGES",
    "SYNTHETIC_PER_KIND",
    "Trust",
    "abstains",
    "assess",
    "synthetic_negatives",
    "unsharded",
]

logger = logging.getLogger(__name__)

SYNTHETIC_PER_KIND = 32
SYNTHETIC_GROUPS = {
    "far": ("noise", "solid colour"),
    "near": ("heavy blur", "shuffled tiles", "swapped colours"),
}
GAUSSIAN_IMAGES = 2048
_ALONE = Rank(rank=0, local_rank=0, world_size=1, local_world_size=1)


@dataclass(frozen=True)
class Trust:
    """The artifact's policy and what the evaluation report says about it."""

    policy: Policy
    calibration: dict[str, Any]
    abstention: dict[str, Any]


def unsharded(parts: Parts, dataset: Dataset[Any]) -> Iterator[Batch]:
    """Every batch of a set, in this process alone (rank 0 runs what follows the epochs)."""
    return eval_batches(dataset, replace(loading(parts, dataset, evaluation=True), rank=_ALONE))


def _outputs(parts: Parts, dataset: Dataset[Any]) -> Outputs:
    """The model's outputs for a whole set, in this process alone."""
    hp = parts.settings.hp
    result, _ = outputs(
        parts.model,
        unsharded(parts, dataset),
        lambda batch: normalize(batch, parts.prep, parts.hw.device, hp.channels_last),
        parts.hw,
    )
    return result


def _fit_gaussian(parts: Parts) -> FeatureGaussian:
    """Class means and shared covariance of the features of (at most GAUSSIAN_IMAGES) training
    images, unaugmented, the same number from each class where they have it."""
    classes = len(parts.splits.classes)
    samples = balanced(parts.splits.train.samples, classes, GAUSSIAN_IMAGES)
    result = _outputs(parts, ImageFolderDataset(samples, parts.prep, augment=False))
    labels = torch.tensor([label for _, label in samples])
    return FeatureGaussian.fit(result.features, labels, classes)


def _shuffled_tiles(
    images: torch.Tensor, generator: torch.Generator, grid: int = 4
) -> torch.Tensor:
    """Each image cut into grid x grid tiles put back in a random order: local texture and colour
    kept, the object gone."""
    n, size, _, channels = images.shape
    t = size // grid
    order = torch.randperm(grid * grid, generator=generator)
    tiles = images[:, : t * grid, : t * grid].reshape(n, grid, t, grid, t, channels)
    tiles = tiles.permute(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, t, t, channels)[:, order]
    shuffled = images.clone()
    shuffled[:, : t * grid, : t * grid] = (
        tiles.reshape(n, grid, grid, t, t, channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(n, t * grid, t * grid, channels)
    )
    return shuffled


def synthetic_negatives(valid: Dataset[Any], size: int, seed: int) -> dict[str, torch.Tensor]:
    """Images of no class, (N, S, S, 3) uint8 per kind: uniform noise and solid colours (far from
    every class), and the first validation images blurred past recognition, cut into shuffled
    tiles, or with their colour channels swapped (near them: what tells a score that sees
    the image apart from one that sees only which class wins)."""
    generator = torch.Generator().manual_seed(seed)
    count = SYNTHETIC_PER_KIND
    colours = torch.randint(0, 256, (count, 1, 1, 3), generator=generator, dtype=torch.uint8)
    sharp = torch.stack([valid[i][0] for i in range(min(count, len(valid)))])  # type: ignore[arg-type]
    radius = max(3, size // 6) | 1
    blurred = tvf.gaussian_blur(sharp.permute(0, 3, 1, 2), [radius * 2 + 1] * 2, [radius / 2] * 2)
    return {
        "noise": torch.randint(0, 256, (count, size, size, 3), generator=generator).byte(),
        "solid colour": colours.expand(count, size, size, 3).contiguous(),
        "heavy blur": blurred.permute(0, 2, 3, 1).contiguous(),
        "shuffled tiles": _shuffled_tiles(sharp, generator),
        "swapped colours": sharp[..., [2, 0, 1]].contiguous(),
    }


def _calibration(result: EvalResult, temperature: float) -> dict[str, Any]:
    kept, labels = result.kept()
    before, after = calibrated(kept.logits, 1.0), calibrated(kept.logits, temperature)
    return {
        "ece_before": ece(before, labels),
        "ece_after": ece(after, labels),
        "nll_before": nll(kept.logits, labels),
        "nll_after": nll(kept.logits, labels, temperature),
        "reliability_before": reliability(before, labels),
        "reliability_after": reliability(after, labels),
    }


def abstains(result: Outputs, policy: Policy) -> torch.Tensor:
    """Which rows the served policy abstains on (the unknown output or a low score)."""
    assert policy.threshold is not None
    low = confidence(result, policy.score, policy) < policy.threshold
    if policy.unknown_output:
        low |= result.logits.argmax(dim=1) == result.logits.shape[1] - 1
    return low


def _worse_group(by_kind: Mapping[str, float | None]) -> float:
    """The mean AUROC of the far kinds or of the near kinds, whichever is lower: a score is only
    as good as it is on the kind of unknown it handles worse."""
    means = []
    for group in SYNTHETIC_GROUPS.values():
        values = [by_kind[kind] or 0.0 for kind in group]
        means.append(sum(values) / len(values))
    return min(means)


def _share(flags: torch.Tensor) -> float | None:
    return float(flags.double().mean()) if len(flags) else None


def assess(parts: Parts, results: Mapping[str, EvalResult]) -> Trust:
    """Temperature, score, threshold and their report, for the model now in `parts.model`."""
    started = time.perf_counter()
    hp = parts.settings.hp
    valid, valid_labels = results["valid"].kept()
    fitted = fit_temperature(valid.logits, valid_labels)
    temperature = 1.0 if fitted is None else fitted
    calibration = {
        "temperature": temperature,
        "fitted": fitted is not None,
        "splits": {name: _calibration(result, temperature) for name, result in results.items()},
    }
    if fitted is None:
        calibration["note"] = (
            "the valid set is classified with such margins that its NLL keeps falling as T "
            "shrinks (no minimum): T stays 1; more validation images let it be fitted"
        )
    logger.info(
        "Calibration: temperature %.3f%s, from %d valid images",
        temperature,
        "" if fitted is not None else " (left at 1: no minimum)",
        len(valid_labels),
    )

    base = Policy(
        temperature=temperature,
        unknown_output=parts.splits.unknown_output,
        gaussian=_fit_gaussian(parts),
    )
    base = replace(base, scales={part: spread(confidence(valid, part, base)) for part in COMBINED})
    valid_images = ImageFolderDataset(parts.splits.valid.samples, parts.prep, augment=False)
    synthetic = {
        kind: _outputs(parts, TensorDataset(images, torch.zeros(len(images), dtype=torch.long)))
        for kind, images in synthetic_negatives(
            valid_images, parts.prep.image_size, hp.seed
        ).items()
    }
    unknown_set = parts.splits.unknown
    unknown = (
        _outputs(parts, ImageFolderDataset(unknown_set.samples, parts.prep, augment=False))
        if unknown_set is not None and unknown_set.samples
        else None
    )
    correct = valid.logits.argmax(dim=1) == valid_labels
    comparison: dict[str, dict[str, Any]] = {}
    for score in SCORES:
        inside = confidence(valid, score, base)
        comparison[score] = {
            "auroc_unknown": None
            if unknown is None
            else auroc(inside, confidence(unknown, score, base)),
            "auroc_by_kind": {
                kind: auroc(inside, confidence(result, score, base))
                for kind, result in synthetic.items()
            },
            "auroc_errors": auroc(inside[correct], inside[~correct]),
        }
    for row in comparison.values():
        row["auroc_synthetic"] = _worse_group(row["auroc_by_kind"])
    measure = "auroc_unknown" if unknown is not None else "auroc_synthetic"
    chosen: Score = max(SCORES, key=lambda s: float(comparison[s][measure] or 0.0))
    threshold = choose_threshold(
        confidence(valid, chosen, base),
        correct,
        abstain_rate=hp.abstain_rate,
        accuracy=hp.abstain_accuracy,
        unknown=None if unknown is None else confidence(unknown, chosen, base),
    )
    policy = replace(base, score=chosen, threshold=threshold.value)
    logger.info(
        "Abstention: %s (AUROC %.3f against %s), threshold %.4g: %s",
        chosen,
        comparison[chosen][measure] or 0.0,
        "the unknown channel" if unknown is not None else "synthetic negatives",
        threshold.value,
        threshold.rule,
    )

    focus, focus_labels = results.get("test", results["valid"]).kept()
    answered = ~abstains(focus, policy)
    focus_correct = focus.logits.argmax(dim=1) == focus_labels
    abstention = {
        "score": chosen,
        "threshold": threshold.value,
        "rule": threshold.rule,
        "target": {"abstain_rate": hp.abstain_rate, "abstain_accuracy": hp.abstain_accuracy},
        "chosen_by": measure,
        "negatives": "unknown channel" if unknown is not None else "synthetic",
        "synthetic_note": "synthetic negatives (noise, solid colours, heavy blur, shuffled "
        "tiles, swapped colour channels) are a floor, "
        "not a substitute for real images of other things: give an `unknown` channel",
        "unknown_output": parts.splits.unknown_output,
        "comparison": comparison,
        "operating_point": {
            "split": "test" if "test" in results else "valid",
            "coverage": _share(answered),
            "accuracy_answered": _share(focus_correct[answered]),
            "accuracy_all": _share(focus_correct),
            "unknown_caught": None if unknown is None else _share(abstains(unknown, policy)),
            "unknown_images": 0 if unknown is None else len(unknown.logits),
            "synthetic_caught": {
                kind: _share(abstains(result, policy)) for kind, result in synthetic.items()
            },
        },
        "risk_coverage": risk_coverage(confidence(focus, chosen, base), focus_correct),
    }
    calibration["seconds"] = round(time.perf_counter() - started, 3)
    return Trust(policy, calibration, abstention)
