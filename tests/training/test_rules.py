"""The job's own Debugger rules: each rule on made-up series, and real `train` runs built to trip
them (and a healthy one that trips none); a loss that becomes NaN stops the job."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from container.decoding import Preprocessing, decode, eval_crop
from container.images import normalize, to_uint8_hwc
from container.model import build
from container.training.debugger import SAVE_INTERVAL
from container.training.rule_recorder import RuleRecorder, gradient_interval
from container.training.rules import (
    EpochLosses,
    GradientRecord,
    StartRecord,
    exploding_tensor,
    loss_not_decreasing,
    overfit,
    overtraining,
    poor_weight_initialization,
    vanishing_gradient,
)
from tests.conftest import FAST, Job, NewJob, TrainRun

RULES = [
    "loss_not_decreasing",
    "overfit",
    "overtraining",
    "vanishing_gradient",
    "exploding_tensor",
    "poor_weight_initialization",
]

# --- each rule on made-up series -------------------------------------------------------------


def _losses(values: list[float]) -> list[tuple[int, float]]:
    return list(enumerate(values))


def _epochs(*pairs: tuple[float, float], steps_per_epoch: int = 8) -> list[EpochLosses]:
    return [
        EpochLosses(epoch=i + 1, step=(i + 1) * steps_per_epoch - 1, train=t, valid=v)
        for i, (t, v) in enumerate(pairs)
    ]


def test_loss_not_decreasing() -> None:
    falling = [2.0 - 0.02 * s for s in range(41)]
    assert loss_not_decreasing(_losses(falling))["status"] == "ok"
    # Down for 21 steps, then back up: the mean of steps 21-30 is no lower than of 11-20.
    stalls = falling[:21] + [1.8] * 20
    verdict = loss_not_decreasing(_losses(stalls))
    assert (verdict["status"], verdict["step"]) == ("issues_found", 30)
    assert "lower lr" in verdict["message"]
    # A loss that jumps at once: the first 10 steps' mean is far above the first step's loss.
    jumps = [1.4] + [300.0 - s for s in range(30)]
    assert loss_not_decreasing(_losses(jumps))["step"] == 10
    # Noise around a falling trend is judged on 10-step means, not single batches.
    noisy = [v + (0.3 if s % 2 else -0.3) if s else v for s, v in enumerate(falling)]
    assert loss_not_decreasing(_losses(noisy))["status"] == "ok"
    short = loss_not_decreasing(_losses(falling[:10]))
    assert (short["status"], short["step"]) == ("not_evaluated", None)
    assert loss_not_decreasing(_losses(falling), diff_percent=50)["status"] == "issues_found"


def test_overfit() -> None:
    assert overfit(_epochs((1.0, 1.05), (0.8, 0.85), (0.7, 0.75)))["status"] == "ok"
    # One epoch above the threshold is allowed (patience=1): a from-scratch first epoch often is.
    assert overfit(_epochs((1.0, 5.0), (0.8, 0.85)))["status"] == "ok"
    verdict = overfit(_epochs((1.0, 1.0), (0.5, 0.6), (0.4, 0.6)))
    assert (verdict["status"], verdict["step"]) == ("issues_found", 23)
    assert "epoch 3" in verdict["message"]
    late = _epochs((1.0, 1.2), (0.5, 0.6), (0.4, 0.41))
    assert overfit(late)["step"] == 15
    assert overfit(late, start_step=8)["status"] == "ok"  # the first epoch is not judged
    assert overfit(_epochs((1.0, 9.0)))["status"] == "ok"  # once is allowed
    assert overfit([])["status"] == "not_evaluated"


def test_overtraining() -> None:
    improving = [(2.0 - 0.15 * i, 2.0 - 0.12 * i) for i in range(12)]
    assert overtraining(_epochs(*improving))["status"] == "ok"
    # The training loss stops improving by more than 0.1 after epoch 2: fires 5 epochs later.
    plateau = [(2.0, 2.0), (1.5, 1.6)] + [(1.45, 1.5)] * 6
    verdict = overtraining(_epochs(*plateau))
    assert (verdict["status"], verdict["step"]) == ("issues_found", 7 * 8 - 1)
    assert "training loss has not improved" in verdict["message"]
    # The validation loss stalls for 10 epochs while the training loss keeps falling.
    diverging = [(2.0 - 0.15 * i, 1.2 + 0.01 * i) for i in range(12)]
    verdict = overtraining(_epochs(*diverging))
    assert (verdict["status"], verdict["step"]) == ("issues_found", 11 * 8 - 1)
    assert "validation loss" in verdict["message"]
    # Shorter than the patience: evaluated, not fired (the service's NoIssuesFound).
    assert overtraining(_epochs(*plateau[:5]))["status"] == "ok"
    assert overtraining(_epochs(*plateau[:1]))["status"] == "not_evaluated"


def _records(*layers: Mapping[str, float]) -> list[GradientRecord]:
    return [GradientRecord(step=10 * i, l2=dict(x), mean_abs=dict(x)) for i, x in enumerate(layers)]


def test_vanishing_gradient() -> None:
    healthy = {"conv1.weight": 1e-3, "fc.weight": 1e-2}
    assert vanishing_gradient(_records(healthy, healthy))["status"] == "ok"
    verdict = vanishing_gradient(_records(healthy, {"conv1.weight": 1e-9, "fc.weight": 1e-2}))
    assert (verdict["status"], verdict["step"]) == ("issues_found", 10)
    assert "conv1.weight" in verdict["message"]
    assert vanishing_gradient([])["status"] == "not_evaluated"
    # A frozen backbone has no gradients to judge; the head's still count.
    assert vanishing_gradient(_records({"fc.weight": 1e-2}))["status"] == "ok"


def test_exploding_tensor() -> None:
    healthy = {"conv1.weight": 1.0, "fc.weight": 2.0}
    assert exploding_tensor(_records(healthy, healthy))["status"] == "ok"
    nan = exploding_tensor(_records(healthy, {"conv1.weight": math.nan, "fc.weight": 2.0}))
    assert (nan["status"], nan["step"]) == ("issues_found", 10)
    infinite = _records({"fc.weight": math.inf})
    assert exploding_tensor(infinite)["status"] == "issues_found"
    assert exploding_tensor(infinite, only_nan=True)["status"] == "ok"
    assert exploding_tensor([])["status"] == "not_evaluated"


def test_poor_weight_initialization() -> None:
    spread = [(s, 0.02) for s in range(10)]
    healthy = StartRecord(relu_input_variance={"relu[1]": 1.0, "layer4.1.relu[2]": 2.0})
    healthy.gradient_spread.extend(spread)
    assert poor_weight_initialization(healthy)["status"] == "ok"
    scaled = StartRecord(relu_input_variance={"relu[1]": 1.0, "layer4.1.relu[2]": 400.0})
    verdict = poor_weight_initialization(scaled)
    assert (verdict["status"], verdict["step"]) == ("issues_found", 0)
    assert "layer4.1.relu[2]" in verdict["message"]
    narrow = StartRecord(relu_input_variance=dict(healthy.relu_input_variance))
    narrow.gradient_spread.extend((s, 1e-5) for s in range(10))
    verdict = poor_weight_initialization(narrow)
    assert (verdict["status"], verdict["step"]) == ("issues_found", 9)
    # One narrow step among the first ten is training's doing, not the starting weights'.
    healthy.gradient_spread[9] = (9, 1e-5)
    assert poor_weight_initialization(healthy)["status"] == "ok"
    assert poor_weight_initialization(None)["status"] == "not_evaluated"  # resumed
    assert poor_weight_initialization(StartRecord())["status"] == "not_evaluated"


def test_gradient_interval_is_the_hooks(tmp_path: Path) -> None:
    config = tmp_path / "debughookconfig.json"
    assert gradient_interval(config) == SAVE_INTERVAL  # no file: what save_tensors uses
    config.write_text(json.dumps({"LocalPath": "/x"}))
    assert gradient_interval(config) == 500  # smdebug's default save_interval
    config.write_text(json.dumps({"HookParameters": {"save_interval": "7"}}))
    assert gradient_interval(config) == 7
    gradients = {"CollectionName": "gradients", "CollectionParameters": {"save_interval": "3"}}
    hook = {"save_interval": "7"}
    config.write_text(json.dumps({"HookParameters": hook, "CollectionConfigurations": [gradients]}))
    assert gradient_interval(config) == 3
    config.write_text("{not json")
    assert gradient_interval(config) == SAVE_INTERVAL


def test_recorder_reads_a_real_network() -> None:
    """ReLU inputs of one whole pass (a block's ReLU runs twice), then the hooks are gone."""
    torch.manual_seed(0)
    model = resnet18(num_classes=4)
    recorder = RuleRecorder(model, first_step=0, interval=2)
    for step in range(3):
        model.zero_grad()
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        recorder.record_gradients(step)
        recorder.record_loss(step, 1.0)
    report = recorder.report([], steps_per_epoch=3)
    evidence = report["rule_evidence"]
    variances = evidence["relu_input_variance"]
    assert len(variances) == 1 + 8 * 2  # the stem's, and two per BasicBlock
    assert {"relu[1]", "layer1.0.relu[2]", "layer4.1.relu[2]"} <= set(variances)
    assert evidence["gradient_norms"]["steps"] == [0, 2]
    assert len(evidence["gradient_norms"]["layers"]) == len(list(model.parameters()))
    assert [s for s, _ in evidence["gradient_spread"]] == [0, 1, 2]
    json.dumps(report, allow_nan=False)  # valid JSON: no NaN or Infinity


# --- real runs, each built to trip rules (or none) --------------------------------------------

FP32 = {**FAST, "mixed_precision": "off"}  # bf16 is slower than fp32 on some of these CPUs


def _fitted_start(dataset: Path, path: Path, scale: Mapping[str, float] | None = None) -> Path:
    """Starting weights as a pretrained file's would be: random ResNet18 weights whose BatchNorm
    statistics fit the training images (from scratch, the first epochs' running statistics lag far
    behind the weights and the validation loss says little), optionally with layers scaled."""
    torch.manual_seed(0)
    model = build("resnet18", 4)
    prep = Preprocessing.for_image_size(FP32["image_size"])
    images = [
        to_uint8_hwc(eval_crop(decode(file, min_side=prep.resize_size), prep))
        for file in sorted((dataset / "train").glob("*/*"))
        if "broken" not in file.name
    ]
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the one pass
    with torch.no_grad():
        model.train()(normalize(torch.stack(images), prep, torch.device("cpu"), False))
    state = model.state_dict()
    for key, factor in (scale or {}).items():
        state[key] = state[key] * factor
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def fitted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fitted_start(dataset, tmp_path_factory.mktemp("weights") / "fitted.pt")


def _head(epochs: int, start: Path, **hp: Any) -> dict[str, Any]:
    """Train only the head on the frozen backbone's cached features: common fine-tuning, fast."""
    return {
        "epochs": epochs,
        "frozen_epochs": epochs,
        "augment": False,
        "lr_schedule": "constant",
        "pretrained": True,
        "pretrained_weights": str(start),
        **hp,
    }


RunJob = Callable[..., tuple[Job, TrainRun]]


@pytest.fixture(scope="module")
def run_job(jobs: NewJob) -> RunJob:
    """Run `train` on a fresh /opt/ml tree (the shared dataset; train and valid channels)."""

    def run(
        name: str, hp: Mapping[str, Any], prepare: Callable[[Job], None] = lambda job: None
    ) -> tuple[Job, TrainRun]:
        job = jobs(name, {**FP32, **hp}, ("train", "valid"))
        prepare(job)
        return job, job.run()

    return run


def _verdicts(job: Job) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in job.report("evaluation.json")["rules"]}


def _fired(run: TrainRun) -> list[str]:
    return re.findall(r"WARNING .* Rule (\w+) fired at step", run.stderr)


def test_a_healthy_run_trips_no_rule(run_job: RunJob, fitted: Path) -> None:
    # The head learning slowly and steadily on a fixed backbone; the frozen backbone has no
    # gradients, so its layers are not judged.
    job, run = run_job("healthy", _head(3, fitted, lr=0.001))
    assert run.returncode == 0, run.stderr
    assert _fired(run) == []
    verdicts = _verdicts(job)
    assert list(verdicts) == RULES
    assert {v["status"] for v in verdicts.values()} == {"ok"}, verdicts
    assert all(v["step"] is None and v["message"] for v in verdicts.values())
    evidence = job.report("evaluation.json")["rule_evidence"]
    assert evidence["losses"]["steps"] == list(range(24))  # 3 epochs of 8 steps
    assert [step for step, _ in evidence["losses"]["compared"]] == [0, 10, 20]
    assert evidence["gradient_norms"]["steps"] == [0, SAVE_INTERVAL, 2 * SAVE_INTERVAL]
    assert list(evidence["gradient_norms"]["layers"]) == ["fc.weight", "fc.bias"]
    assert len(evidence["relu_input_variance"]) == 17  # the cached features' one pass
    html = (job.opt_ml.output_data_dir / "evaluation.html").read_text()
    section = html[html.index("<h2>Debugger rules</h2>") :]
    assert section.count("<img") >= 3  # losses, gradient norms, first activations
    assert "ISSUES FOUND" not in section


def test_a_learning_rate_far_too_high(run_job: RunJob, fitted: Path) -> None:
    job, run = run_job("too_high", _head(3, fitted, lr=5.0))
    assert run.returncode == 0, run.stderr
    verdict = _verdicts(job)["loss_not_decreasing"]
    assert (verdict["status"], verdict["step"]) == ("issues_found", 10), verdict
    assert _fired(run) == ["loss_not_decreasing"]
    assert "lower lr" in verdict["message"]
    html = (job.opt_ml.output_data_dir / "evaluation.html").read_text()
    assert "ISSUES FOUND" in html[html.index("<h2>Debugger rules</h2>") :]


def test_a_tiny_train_set_trained_long(run_job: RunJob, fitted: Path) -> None:
    def keep_two_per_class(job: Job) -> None:
        for folder in job.opt_ml.channel_dir("train").iterdir():
            for extra in sorted(folder.iterdir())[2:]:
                extra.unlink()

    job, run = run_job("tiny", _head(12, fitted, lr=0.01, batch_size=4), keep_two_per_class)
    assert run.returncode == 0, run.stderr
    verdicts = _verdicts(job)
    for name in ("overfit", "overtraining"):
        assert verdicts[name]["status"] == "issues_found", verdicts[name]
    assert _fired(run) == ["overfit", "overtraining"]  # logged as each fired, in that order
    # 2 steps an epoch: it overfits by epoch 3 and stops improving 5 epochs after that.
    assert verdicts["overfit"]["step"] < verdicts["overtraining"]["step"]
    assert "training loss has not improved" in verdicts["overtraining"]["message"]


def test_badly_scaled_starting_weights(run_job: RunJob, dataset: Path, tmp_path: Path) -> None:
    """A pretrained file with two badly scaled layers. The stem's BatchNorm scale is almost zero:
    its ReLU input is a trillion times smaller than the others'. The last convolution's weights are
    a million times too large: the BatchNorm after it hides that in the forward pass, but its
    gradients become a million times smaller (they scale with 1 / the weights' norm)."""
    scale = {"bn1.weight": 1e-6, "bn1.bias": 1e-6, "layer4.1.conv2.weight": 1e6}
    bad = _fitted_start(dataset, tmp_path / "bad.pt", scale)
    job, run = run_job(
        "bad_start", {"epochs": 1, "pretrained": True, "pretrained_weights": str(bad)}
    )
    assert run.returncode == 0, run.stderr
    verdicts = _verdicts(job)
    for name in ("poor_weight_initialization", "vanishing_gradient"):
        assert (verdicts[name]["status"], verdicts[name]["step"]) == ("issues_found", 0)
    assert sorted(_fired(run)) == ["poor_weight_initialization", "vanishing_gradient"]
    assert "relu[1]" in verdicts["poor_weight_initialization"]["message"]
    assert "layer4.1.conv2.weight" in verdicts["vanishing_gradient"]["message"]


def test_a_loss_that_becomes_nan_stops_every_process_without_a_model(run_job: RunJob) -> None:
    """Two processes agree on the stop at the step the loss broke: none hangs in a collective.
    They check every third step (on the CPU, every step unless told), as a GPU job does every 20:
    the job fails at the next check, naming the step that broke."""
    hp = {"epochs": 2, "lr": 10_000.0, "processes_per_host": 2, "check_steps": 3}
    job, run = run_job("nan", hp)
    assert run.returncode == 1, run.stderr
    failure = job.failure()
    assert failure is not None, run.stderr
    assert re.match(r"DivergenceError: the training loss became (nan|inf) at step \d+", failure)
    for advice in ("Lower lr (it is 10000)", "mixed_precision=off", "check the training data"):
        assert advice in failure
    assert "Traceback" not in failure
    stopped = re.findall(
        r"ERROR \[rank (\d)\] .* the training loss became .* at step (\d+)", run.stderr
    )
    assert sorted(rank for rank, _ in stopped) == ["0", "1"]
    assert len({step for _, step in stopped}) == 1  # the same step on both
    assert run.metric("epoch") == []  # stopped within the first epoch
    assert not (job.opt_ml.model_dir / "model.pt").exists()
    assert not (job.opt_ml.output_data_dir / "evaluation.json").exists()
    assert "exploding_tensor" in _fired(run)  # the gradients of the step that broke
