"""int8 at the end of training: the gate's verdict, the int8 abstention policy, and what the job
writes (the weights when the gate passes, its numbers in model_meta.json and the reports)."""

from __future__ import annotations

import json

import pytest
import torch

from container import int8
from container.abstention import FeatureGaussian, Outputs, Policy, confidence, matched
from container.model import INT8_FILE, load_artifact
from container.sagemaker_env import OptMl
from container.training.quantization import CALIBRATION_IMAGES, gate
from tests.conftest import FAST, NewJob


def _outputs(top: list[int], classes: int = 4) -> Outputs:
    logits = torch.zeros(len(top), classes)
    logits[torch.arange(len(top)), torch.tensor(top)] = 5.0
    return Outputs(logits, torch.zeros(len(top), 8))


LABELS = torch.tensor([0, 1, 2, 3] * 25)


def test_the_gate_passes_an_int8_network_that_answers_as_fp32() -> None:
    same = _outputs(LABELS.tolist())
    verdict = gate(same, same, LABELS, (Policy(), Policy()), 0.99, 0.005)
    assert verdict["passed"]
    assert verdict["gate"] | {"images": 100} == verdict["gate"]
    assert (verdict["gate"]["agreement"], verdict["gate"]["accuracy_drop"]) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("flipped", "min_agreement", "max_drop", "passed", "words"),
    [
        (1, 0.99, 0.005, False, "a drop of 1.00 points, at most 0.50"),
        (1, 0.99, 0.01, True, "top-1 agreement with fp32 99.00% (at least 99.00%)"),
        (2, 0.99, 0.05, False, "top-1 agreement with fp32 98.00% (at least 99.00%)"),
        (1, 1.0, 1.0, False, "(at least 100.00%)"),
    ],
)
def test_the_gate_judges_agreement_and_accuracy(
    flipped: int, min_agreement: float, max_drop: float, passed: bool, words: str
) -> None:
    top = LABELS.tolist()
    for i in range(flipped):
        top[i] = (top[i] + 1) % 4  # right under fp32, wrong under int8
    verdict = gate(
        _outputs(LABELS.tolist()),
        _outputs(top),
        LABELS,
        (Policy(), Policy()),
        min_agreement,
        max_drop,
    )
    assert verdict["passed"] is passed
    assert words in verdict["reason"]
    assert verdict["gate"]["accuracy_drop"] == pytest.approx(flipped / 100)


def test_the_int8_policy_abstains_on_as_many_images_as_fp32s() -> None:
    """Quantized features shift the feature distance; the int8 threshold follows the shift."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=generator)
    labels = torch.arange(200) % 4
    gaussian = FeatureGaussian.fit(features, labels, 4)
    logits = torch.randn(200, 4, generator=generator)
    fp32 = Outputs(logits, features)
    shifted = Outputs(logits * 1.1, features * 1.3 + 0.2)
    base = Policy(score="mahalanobis", gaussian=gaussian)
    threshold = float(confidence(fp32, "mahalanobis", base).sort().values[10])
    policy = Policy(score="mahalanobis", threshold=threshold, gaussian=gaussian)
    moved = matched(policy, fp32, shifted)
    declined32 = confidence(fp32, "mahalanobis", policy) < policy.threshold
    declined8 = confidence(shifted, "mahalanobis", moved) < moved.threshold
    assert int(declined32.sum()) == int(declined8.sum()) == 10
    assert moved.threshold != policy.threshold
    assert (confidence(shifted, "mahalanobis", policy) < policy.threshold).sum() != 10
    assert matched(Policy(), fp32, shifted) == Policy()  # no threshold: nothing to move


def test_the_trained_model_ships_int8_that_passed_its_gate(trained: OptMl) -> None:
    artifact = load_artifact(trained.model_dir)
    entry = artifact.meta[int8.META_KEY]
    numbers = entry["gate"]
    assert entry["passed"]
    assert numbers["agreement"] >= numbers["min_agreement"] == 0.99
    assert numbers["accuracy_drop"] <= numbers["max_accuracy_drop"] == 0.005
    valid = [p for p in trained.channel_dir("valid").rglob("*") if p.is_file()]
    assert numbers["images"] == len(valid)  # every valid image (fewer than GATE_IMAGES)
    assert 0 < entry["calibration_images"] <= CALIBRATION_IMAGES
    assert int8.available(artifact) is None
    assert artifact.int8_state is not None  # quantized weights: a quarter of fp32's bytes
    size = {name: (trained.model_dir / name).stat().st_size for name in (INT8_FILE, "model.pt")}
    assert size[INT8_FILE] < 0.3 * size["model.pt"]
    evaluation = json.loads((trained.output_data_dir / "evaluation.json").read_text())
    assert evaluation["int8"] == entry
    assert any(f["text"].startswith("int8: ships") for f in evaluation["findings"])
    profile = json.loads((trained.output_data_dir / "profile.json").read_text())
    assert profile["after_epochs_s"]["int8 quantization and gate"] == entry["seconds"] > 0


def test_a_model_that_fails_the_gate_ships_without_int8(jobs: NewJob) -> None:
    """A gate a barely trained model's int8 network does not pass: every valid image answered as
    fp32 answers it (one epoch at lr 1e-5 leaves close calls, some of which int8 flips, whether
    the job has one CPU thread or two)."""
    hyperparameters = {**FAST, "epochs": 1, "lr": 1e-5, "int8": True, "int8_min_agreement": 1.0}
    job = jobs("int8-gate", hyperparameters)
    run = job.run()
    assert run.returncode == 0, run.stderr
    entry = job.meta()[int8.META_KEY]
    assert not entry["passed"], entry
    assert entry["gate"]["agreement"] < 1.0
    assert not (job.opt_ml.model_dir / INT8_FILE).exists()
    assert f"int8: not shipped, the gate failed: {entry['reason']}" in run.stderr
    assert int8.available(load_artifact(job.opt_ml.model_dir)) == (
        f"the model's int8 version failed its gate at training: {entry['reason']}"
    )
    assert any(
        f["text"].startswith("int8: not shipped") for f in job.report("evaluation.json")["findings"]
    )
