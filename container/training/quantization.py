"""After calibration (rank 0): the int8 network, and the gate that decides whether it ships.

The network is quantized (container/int8.py) with activation ranges observed on up to
CALIBRATION_IMAGES training images, unaugmented, the same number from each class; then the int8
and the fp32 networks run on up to GATE_IMAGES validation images, which the calibration never saw.
It ships when its top-1 agrees with fp32's on at least `int8_min_agreement` of them and its
accuracy is at most `int8_max_accuracy_drop` below fp32's; model_meta.json records the numbers
either way (with how often the abstention decision agrees, which the gate reports but does not
judge: the threshold was chosen on fp32 scores), and a model that fails is served without int8.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from container import int8
from container.abstention import Outputs, Policy, matched
from container.images import normalize
from container.model import WithFeatures
from container.training.data import ImageFolderDataset, balanced
from container.training.state import Parts
from container.training.trust import abstains, unsharded

__all__ = ["CALIBRATION_IMAGES", "GATE_IMAGES", "Int8Result", "gate", "quantize"]

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 512
GATE_IMAGES = 2048
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Int8Result:
    """What the artifact gets: the int8 weights when they passed, and the meta entry."""

    state: dict[str, Any] | None
    meta: dict[str, Any]


def _inputs(
    parts: Parts, samples: Sequence[tuple[str, int]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float32 CPU batches of `samples`, unaugmented, with their labels."""
    dataset = ImageFolderDataset(samples, parts.prep, augment=False)
    for images, labels in unsharded(parts, dataset):
        yield normalize(images, parts.prep, _CPU), labels


def gate(
    fp32: Outputs,
    quantized: Outputs,
    labels: torch.Tensor,
    policies: tuple[Policy, Policy],
    min_agreement: float,
    max_drop: float,
) -> dict[str, Any]:
    """The int8 network's numbers against fp32's on the same images, and the verdict;
    `policies` are fp32's abstention policy and int8's (`abstention.matched`)."""
    top32, top8 = fp32.logits.argmax(dim=1), quantized.logits.argmax(dim=1)
    agreement = float((top32 == top8).float().mean())
    accuracy32 = float((top32 == labels).float().mean())
    accuracy8 = float((top8 == labels).float().mean())
    drop = accuracy32 - accuracy8
    passed = agreement >= min_agreement and drop <= max_drop
    reason = (
        f"top-1 agreement with fp32 {agreement:.2%} (at least {min_agreement:.2%}), accuracy "
        f"{accuracy32:.2%} fp32, {accuracy8:.2%} int8 (a drop of {100 * drop:.2f} points, at "
        f"most {100 * max_drop:.2f}) on {len(labels)} validation images"
    )
    numbers: dict[str, Any] = {
        "images": len(labels),
        "agreement": round(agreement, 6),
        "accuracy_fp32": round(accuracy32, 6),
        "accuracy_int8": round(accuracy8, 6),
        "accuracy_drop": round(drop, 6),
        "min_agreement": min_agreement,
        "max_accuracy_drop": max_drop,
    }
    policy32, policy8 = policies
    if policy32.threshold is not None:
        same = abstains(fp32, policy32) == abstains(quantized, policy8)
        numbers["abstention_agreement"] = round(float(same.float().mean()), 6)
    return {"passed": passed, "reason": reason, "gate": numbers}


@torch.inference_mode()
def quantize(parts: Parts, policy: Policy) -> Int8Result | None:
    """The int8 network of the model now in `parts.model` and its gate (None with `int8=false`)."""
    hp = parts.settings.hp
    if not hp.int8:
        return None
    started = time.perf_counter()
    classes, size = len(parts.splits.classes), parts.prep.image_size
    network = WithFeatures(parts.model).eval()
    calibration = balanced(parts.splits.train.samples, classes, CALIBRATION_IMAGES)
    quantized = int8.calibrate(network, (x for x, _ in _inputs(parts, calibration)), size)
    kept: dict[str, list[torch.Tensor]] = {k: [] for k in ("l32", "f32", "l8", "f8", "labels")}
    device = parts.hw.device
    for x, labels in _inputs(parts, balanced(parts.splits.valid.samples, classes, GATE_IMAGES)):
        logits, features = network(x.to(device))
        kept["l32"].append(logits.float().cpu())
        kept["f32"].append(features.float().cpu())
        logits, features = quantized(x)
        kept["l8"].append(logits)
        kept["f8"].append(features)
        kept["labels"].append(labels)
    joined = {k: torch.cat(v) for k, v in kept.items()}
    reference, answers = (
        Outputs(joined["l32"], joined["f32"]),
        Outputs(joined["l8"], joined["f8"]),
    )
    policy8 = matched(policy, reference, answers)
    verdict = gate(
        reference,
        answers,
        joined["labels"],
        (policy, policy8),
        hp.int8_min_agreement,
        hp.int8_max_accuracy_drop,
    )
    meta = {
        "backend": int8.BACKEND,
        **verdict,
        "calibration_images": len(calibration),
        "seconds": round(time.perf_counter() - started, 3),
        # read by Policy.from_meta: the threshold and scales for int8's own scores
        **({"abstention": policy8.to_meta()} if policy.threshold is not None else {}),
    }
    if verdict["passed"]:
        logger.info("int8: ships (%s), in %.1f s", verdict["reason"], meta["seconds"])
        return Int8Result(quantized.state_dict(), meta)
    logger.warning("int8: not shipped, the gate failed: %s", verdict["reason"])
    return Int8Result(None, meta)
