"""The profiler's findings: each check on synthetic profiles, then on real `train` runs built to
trip one (a loader slowed by large images, checkpoints outweighing short epochs); and smdebug
tensors recorded without SageMaker's DebugHookConfig (`save_tensors`)."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from smdebug import modes
from smdebug.exceptions import TensorUnavailableForStep
from smdebug.trials import create_trial

from container.sample_data import SampleSpec, make_dataset
from container.training.findings import Finding, judge
from container.training.profiler import PHASES
from tests.conftest import FAST, Job, NewJob, TrainRun

# --- synthetic profiles -------------------------------------------------------------------------


def _epoch(n: int, steps: list[float] | None = None, **seconds: float) -> dict[str, Any]:
    steps = [0.1] * 10 if steps is None else steps
    phases = {"data": 0.01, "forward_backward": 0.7, "optimizer": 0.2, "evaluation": 0.05}
    phases |= {"checkpoint": 0.05, **seconds}
    return {
        "epoch": n,
        "seconds": phases,
        "train_images": 64,
        "wall_s": sum(phases.values()),
        "step_s": steps,
    }


def _sample(t: float, cpu: float = 50.0, gpu: float | None = None, **more: float) -> dict[str, Any]:
    return {
        "t": t,
        "cpu_percent": cpu,
        "cpu_max_core_percent": more.get("core", cpu),
        "rss_mb": 900.0,
        "memory_percent": 10.0,
        "gpu_percent": gpu,
        "gpu_memory_mb": more.get("memory"),
    }


def _profile(**changes: Any) -> dict[str, Any]:
    """A healthy CPU run: 3 epochs of 10 steps, quick checkpoints and evaluation."""
    return {
        "setup": {"device": "cpu", "loader_workers": 0, "cpu_threads": 8, "batch_size": 32}
        | {"image_size": 224},
        "device": "cpu",
        "initialization_s": 12.0,
        "gpu_memory_total_mb": None,
        "epochs": [_epoch(n) for n in (1, 2, 3)],
        "samples": [_sample(float(t)) for t in range(30)],
    } | changes


def _gpu_profile(samples: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    """A GPU run long enough to judge: 600 s in 2 epochs, samples from t=60 s on count."""
    epochs = [_epoch(1, forward_backward=299.0), _epoch(2, forward_backward=299.0)]
    return _profile(epochs=epochs, samples=samples, gpu_memory_total_mb=16000.0) | changes


def _by_name(profile: Mapping[str, Any]) -> dict[str, Finding]:
    return {f.name: f for f in judge(profile)}


def _verdicts(profile: Mapping[str, Any]) -> dict[str, str]:
    return {name: f.verdict for name, f in _by_name(profile).items()}


GPU_CHECKS = ("cpu_bottleneck", "low_gpu_utilization", "batch_size", "gpu_memory_increase")


def test_a_healthy_cpu_run_is_ok_and_gpu_checks_are_not_evaluated() -> None:
    assert _verdicts(_profile()) == {
        "initialization": "ok",
        "dataloader": "ok",
        **dict.fromkeys(GPU_CHECKS, "not_evaluated"),
        "step_outliers": "not_evaluated",  # 30 steps; StepOutlier wants more than 100
        "checkpoints": "ok",
        "evaluation": "ok",
    }
    for finding in judge(_profile()):
        assert finding.message
        assert finding.recommendation == ""  # nothing to do


def test_every_finding_names_its_rule_and_thresholds() -> None:
    findings = judge(_profile())
    assert [f.name for f in findings] == [
        "initialization",
        "dataloader",
        "cpu_bottleneck",
        "low_gpu_utilization",
        "batch_size",
        "gpu_memory_increase",
        "step_outliers",
        "checkpoints",
        "evaluation",
    ]
    assert all(f.rule for f in findings)
    rules = {f.name: f.rule for f in findings}
    assert rules["initialization"] == "MaxInitializationTime"
    assert rules["step_outliers"] == "StepOutlier"
    gpu = judge(_gpu_profile([_sample(60.0 + t, gpu=90.0, memory=8000.0) for t in range(20)]))
    assert {f.name: f.thresholds for f in gpu}["low_gpu_utilization"] == {
        "threshold_p95": 70.0,
        "threshold_p5": 10.0,
        "window": 500,
    }


def test_an_old_profile_without_step_times_or_start_is_not_evaluated() -> None:
    profile = _profile(epochs=[{k: v for k, v in _epoch(1).items() if k != "step_s"}])
    del profile["initialization_s"], profile["gpu_memory_total_mb"]
    verdicts = _verdicts(profile)
    assert verdicts["initialization"] == "not_evaluated"
    assert verdicts["step_outliers"] == "not_evaluated"


def test_no_epochs_at_all() -> None:
    verdicts = _verdicts(_profile(epochs=[], samples=[], initialization_s=None))
    assert set(verdicts.values()) == {"not_evaluated"}


def test_initialization_longer_than_20_minutes() -> None:
    ok = _by_name(_profile(initialization_s=1199.0))["initialization"]
    slow = _by_name(_profile(initialization_s=1201.0))["initialization"]
    assert ok.verdict == "ok"
    assert slow.verdict == "issues_found"
    assert "more than the 20 minutes" in slow.message
    assert slow.numbers["initialization_s"] == 1201.0


def test_waiting_for_batches() -> None:
    slow = [_epoch(n, data=0.3, forward_backward=0.5, optimizer=0.2) for n in (1, 2)]
    finding = _by_name(_profile(epochs=slow))["dataloader"]
    assert finding.verdict == "issues_found"
    assert finding.numbers["wait_percent"] == 30.0
    assert "raise `workers` (now 0; the job has 8 CPUs" in finding.recommendation
    assert "short side about 256 px for image_size=224" in finding.recommendation
    # Every CPU already decodes: more workers would not help, more CPUs would.
    busy = _profile(epochs=slow, setup=_profile()["setup"] | {"loader_workers": 7})
    assert "more CPUs (the job has 8)" in _by_name(busy)["dataloader"].recommendation
    under = [_epoch(n, data=0.19, forward_backward=0.61, optimizer=0.2) for n in (1, 2)]
    assert _by_name(_profile(epochs=under))["dataloader"].verdict == "ok"


def test_checkpoints_judged_on_the_median_epoch() -> None:
    heavy = [_epoch(n, checkpoint=0.5) for n in (1, 2, 3)]  # 0.5 of 1.46 s: 34%
    finding = _by_name(_profile(epochs=heavy))["checkpoints"]
    assert finding.verdict == "issues_found"
    assert finding.numbers["median_percent"] == 34.2
    assert "last.pt" in finding.recommendation
    # One epoch slowed by something else does not decide.
    once = [_epoch(1, checkpoint=5.0), _epoch(2), _epoch(3)]
    assert _by_name(_profile(epochs=once))["checkpoints"].verdict == "ok"


def test_evaluation_share() -> None:
    heavy = [_epoch(n, evaluation=0.6) for n in (1, 2)]
    finding = _by_name(_profile(epochs=heavy))["evaluation"]
    assert finding.verdict == "issues_found"
    assert "smaller valid channel" in finding.recommendation


def _steps(normal: int, slow_at: list[int]) -> list[float]:
    return [1.0 if i in slow_at else 0.1 + 0.001 * (i % 7) for i in range(normal)]


def test_step_outliers_need_more_than_100_steps_and_10_outliers() -> None:
    few = _profile(epochs=[_epoch(1, _steps(100, list(range(20))))])
    assert _by_name(few)["step_outliers"].verdict == "not_evaluated"
    ten = _profile(epochs=[_epoch(1, _steps(300, list(range(50, 60))))])
    assert _by_name(ten)["step_outliers"].verdict == "ok"
    eleven = _profile(epochs=[_epoch(1, _steps(300, list(range(50, 61))))])
    finding = _by_name(eleven)["step_outliers"]
    assert finding.verdict == "issues_found"
    assert finding.numbers["outliers"] == 11
    assert "epoch 1 step 51" in finding.message
    assert "not tied to the start of epochs" in finding.recommendation


def test_step_outliers_at_the_start_of_each_epoch_are_named() -> None:
    epochs = [_epoch(n, _steps(20, [0])) for n in range(1, 13)]  # 240 steps, 12 slow first ones
    finding = _by_name(_profile(epochs=epochs))["step_outliers"]
    assert finding.verdict == "issues_found"
    assert "12 of them are the first step of an epoch" in finding.recommendation


def test_cpu_bottleneck_counts_samples_after_start_up() -> None:
    starved = [_sample(60.0 + t, cpu=60, core=100, gpu=5, memory=8000) for t in range(60)]
    busy = [_sample(120.0 + t, cpu=60, core=100, gpu=95, memory=8000) for t in range(40)]
    finding = _by_name(_gpu_profile(starved + busy))["cpu_bottleneck"]
    assert finding.verdict == "issues_found"
    assert finding.numbers["bottleneck_percent"] == 60.0
    assert "`workers`" in finding.recommendation
    # The same starved samples during the first minute are start-up, not a bottleneck.
    early = [_sample(t, cpu=60, core=100, gpu=5, memory=8000) for t in range(60)]
    assert _by_name(_gpu_profile(early + busy))["cpu_bottleneck"].verdict == "ok"


def test_low_and_fluctuating_gpu_utilisation() -> None:
    low = [_sample(60.0 + t, gpu=40, memory=8000) for t in range(50)]
    finding = _by_name(_gpu_profile(low))["low_gpu_utilization"]
    assert (finding.verdict, finding.numbers["p95"]) == ("issues_found", 40.0)
    assert "`batch_size` (now 32)" in finding.recommendation
    swings = [_sample(60.0 + t, gpu=95 if t % 2 else 0, memory=8000) for t in range(50)]
    finding = _by_name(_gpu_profile(swings))["low_gpu_utilization"]
    assert finding.verdict == "issues_found"
    assert "swings" in finding.message
    steady = [_sample(60.0 + t, gpu=90, memory=8000) for t in range(50)]
    assert _by_name(_gpu_profile(steady))["low_gpu_utilization"].verdict == "ok"
    assert _by_name(_gpu_profile(steady[:9]))["low_gpu_utilization"].verdict == "not_evaluated"


def test_batch_size_too_small_for_the_gpu() -> None:
    idle = [_sample(60.0 + t, cpu=30, gpu=40, memory=3000) for t in range(50)]
    finding = _by_name(_gpu_profile(idle))["batch_size"]
    assert finding.verdict == "issues_found"
    assert finding.numbers["gpu_memory_p95"] == 18.8
    assert "Raise `batch_size` (now 32" in finding.recommendation
    full = [_sample(60.0 + t, cpu=30, gpu=40, memory=12000) for t in range(50)]
    assert _by_name(_gpu_profile(full))["batch_size"].verdict == "ok"


def test_gpu_memory_jump() -> None:
    creeping = [_sample(60.0 + t, gpu=90, memory=4000 + 10 * t) for t in range(60)]
    assert _by_name(_gpu_profile(creeping))["gpu_memory_increase"].verdict == "ok"
    jump = [_sample(60.0 + t, gpu=90, memory=4000 if t < 40 else 14000) for t in range(60)]
    finding = _by_name(_gpu_profile(jump))["gpu_memory_increase"]
    assert finding.verdict == "issues_found"
    assert finding.numbers["peak_percent"] == 87.5
    assert "lower `batch_size`" in finding.recommendation


# --- real runs ----------------------------------------------------------------------------------

# One CPU: torch then runs one thread, whose speed falls with the machine's load in step with the
# loader's and the checkpoint writer's, so the shares these runs are built around hold on a busy
# CI machine too (two threads that spin-wait for each other slow down far more).
ONE_CPU = ("taskset", "-c", str(min(os.sched_getaffinity(0))))
TINY = SampleSpec(classes=2, per_class={"train": 4, "valid": 2}, corrupt={})
"""Two steps of 4 images per epoch: checkpoints (~180 MB a time) outweigh the training."""


def _run(jobs: NewJob, name: str, data: Path, **hyperparameters: Any) -> tuple[Job, TrainRun]:
    job = jobs(name, {**FAST, **hyperparameters}, ("train", "valid"), data)
    run = job.run(wrapper=ONE_CPU)
    assert run.returncode == 0, run.stderr
    return job, run


def _findings(job: Job) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in job.report("profile.json")["findings"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(scope="module")
def short_epochs(jobs: NewJob, tiny: Path) -> tuple[Job, TrainRun]:
    """A healthy little run whose epochs are mostly checkpoint, recording its own tensors."""
    return _run(jobs, "short", tiny, batch_size=4, save_tensors=True)


@pytest.fixture(scope="module")
def slow_loader(jobs: NewJob, tmp_path_factory: pytest.TempPathFactory) -> tuple[Job, TrainRun]:
    """Large PNGs (no JPEG draft decoding) cropped to 32 px, no loader workers, 8 to a batch:
    decoding a batch takes far longer than the step that trains on it (at 32 px a step costs
    about the same whatever the batch size)."""
    data = make_dataset(
        tmp_path_factory.mktemp("large"),
        SampleSpec(
            classes=2,
            per_class={"train": 1, "valid": 1},
            min_side=1500,
            max_side=1600,
            png_every=1,
            corrupt={},
        ),
    )
    for image in sorted(data.glob("train/*/*.png")):  # 8 of each: copies decode as slowly
        for n in range(1, 8):
            shutil.copy(image, image.with_stem(f"{image.stem}_copy{n}"))
    return _run(jobs, "slow", data, batch_size=8, workers=0)


def test_a_slow_loader_is_found(slow_loader: tuple[Job, TrainRun]) -> None:
    job, run = slow_loader
    finding = _findings(job)["dataloader"]
    assert finding["verdict"] == "issues_found", finding
    assert finding["numbers"]["wait_percent"] > 20
    # One CPU: a worker process would only take it from the model.
    assert "more CPUs (the job has 1)" in finding["recommendation"]
    assert "store the images already resized" in finding["recommendation"]
    assert "Profiler: Waiting for batches: Training steps spent" in run.stderr


def test_checkpoints_outweighing_short_epochs_are_found(short_epochs: tuple[Job, TrainRun]) -> None:
    job, run = short_epochs
    findings = _findings(job)
    assert findings["checkpoints"]["verdict"] == "issues_found", findings["checkpoints"]
    assert "Profiler: Time lost to checkpoints:" in run.stderr
    assert "raise checkpoint_epochs" in findings["checkpoints"]["recommendation"]
    # The rest of this healthy run stays quiet.
    assert {n: f["verdict"] for n, f in findings.items() if n != "checkpoints"} == {
        "initialization": "ok",
        "dataloader": "ok",
        **dict.fromkeys(GPU_CHECKS, "not_evaluated"),
        "step_outliers": "not_evaluated",
        "evaluation": "ok",
    }
    profile = job.report("profile.json")
    assert next(iter(profile)) == "findings"
    assert [len(e["step_s"]) for e in profile["epochs"]] == [2, 2]
    assert all(set(e["seconds"]) == set(PHASES) for e in profile["epochs"])
    assert 0 < profile["initialization_s"] < 300
    html = (job.opt_ml.output_data_dir / "profile.html").read_text()
    assert html.index("Findings") < html.index("Setup") < html.index("Epochs")
    assert "Time lost to checkpoints" in html


def test_save_tensors_records_smdebug_tensors_without_a_hook_config(
    short_epochs: tuple[Job, TrainRun],
) -> None:
    job, run = short_epochs
    tensors = job.opt_ml.output_data_dir / "debug-tensors"
    assert f"SageMaker Debugger on: writing tensors to {tensors}" in run.stderr
    # It ships in output.tar.gz: ~210 kB here, ~50 kB per gradient save (ResNet18's 62
    # parameters, 3 reductions each, whatever the image size). Full tensors, as the service's
    # hook saves them, were 136 MB for this run (ResNet18's gradients and weights, 45 MB each),
    # ~11 GB for a default dog-breed job (~1,250 steps, every 10th); that job now makes 63
    # gradient saves (`own_save_interval`): ~3.5 MB with its per-step losses.
    size = sum(f.stat().st_size for f in tensors.rglob("*") if f.is_file())
    assert size < 2_000_000, size
    trial = create_trial(str(tensors))
    # 2 TRAIN steps per epoch, 2 epochs: losses, and gradients' reductions, at every one.
    (loss,) = trial.tensor_names(collection="losses")
    assert sorted(trial.tensor(loss).values(mode=modes.TRAIN)) == [0, 1, 2, 3]
    gradient = trial.tensor("gradient/ResNet_fc.weight")
    assert gradient.name in trial.tensor_names(collection="gradients")
    assert gradient.steps(mode=modes.TRAIN) == [0, 1, 2, 3]
    with pytest.raises(TensorUnavailableForStep):  # reductions only
        gradient.value(0, mode=modes.TRAIN)
    norm = float(gradient.reduction_value(0, "l2", mode=modes.TRAIN))
    assert 0 < norm < math.inf
    assert float(gradient.reduction_value(0, "max", mode=modes.TRAIN, abs=True)) <= norm
    assert not trial.tensor_names(collection="weights")
    assert not trial.tensor_names(collection="biases")
    relu = trial.tensor(trial.tensor_names(collection="relu_input")[0])
    assert relu.steps(mode=modes.EVAL) == []
    assert float(relu.reduction_value(0, "variance", mode=modes.TRAIN)) > 0
