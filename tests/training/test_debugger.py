"""SageMaker Debugger: tensors readable with smdebug's trial API, and never able to fail a job."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from smdebug import modes
from smdebug.trials import create_trial
from torch import nn

from container.model import build
from container.training.debugger import SAVE_INTERVAL, create_hook, own_save_interval
from tests.conftest import FAST, ROOT, Job, NewJob, TrainRun

HOOK_CONFIG: dict[str, Any] = {
    "S3OutputPath": "s3://bucket/job/debug-output",
    "LocalPath": "/opt/ml/output/tensors",
    "HookParameters": {"save_interval": "2"},
    "CollectionConfigurations": [
        {"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}},
        {"CollectionName": "weights"},
        {"CollectionName": "biases"},
        {"CollectionName": "gradients"},
    ],
    "DebugHookSpecification": None,
}


def _hook_config(job: Job, **changes: object) -> Path:
    tensors = job.opt_ml.output_dir / "tensors"
    job.write_config("debughookconfig.json", {**HOOK_CONFIG, "LocalPath": str(tensors), **changes})
    return tensors


@pytest.fixture(scope="module")
def debugged(jobs: NewJob) -> tuple[Job, TrainRun, Path]:
    """A job with SageMaker's hook config, asked to save tensors of its own as well."""
    job = jobs("debugged", {**FAST, "save_tensors": True})
    tensors = _hook_config(job)
    run = job.run()
    assert run.returncode == 0, run.stderr
    return job, run, tensors


def test_tensors_are_readable_with_the_trial_api(debugged: tuple[Job, TrainRun, Path]) -> None:
    _, run, tensors = debugged
    assert f"SageMaker Debugger on: writing tensors to {tensors}" in run.stderr

    trial = create_trial(str(tensors))
    # 8 training steps per epoch for 2 epochs; losses every step, the rest every other step.
    assert trial.steps(mode=modes.TRAIN) == list(range(16))
    assert trial.tensor("ResNet_conv1.weight").steps(mode=modes.TRAIN) == list(range(0, 16, 2))
    assert len(trial.steps(mode=modes.EVAL)) >= 2
    (loss,) = trial.tensor_names(collection="losses")
    train_losses = trial.tensor(loss).values(mode=modes.TRAIN)
    assert len(train_losses) == 16  # losses every step
    assert all(value > 0 for value in train_losses.values())
    assert trial.tensor(loss).values(mode=modes.EVAL)
    assert "gradient/ResNet_fc.weight" in trial.tensor_names(collection="gradients")
    assert "ResNet_conv1.weight" in trial.tensor_names(collection="weights")
    assert "ResNet_fc.bias" in trial.tensor_names(collection="biases")
    gradient = trial.tensor("gradient/ResNet_fc.weight").value(0, mode=modes.TRAIN)
    assert gradient.shape == (4, 512)


def test_bf16_activations_are_saved_as_float32(job: Job) -> None:
    """Rules such as poor_weight_initialization want ReLU inputs: bf16 under autocast."""
    relu_input = {
        "CollectionName": "relu_input",
        "CollectionParameters": {"include_regex": ".*relu_input"},
    }
    tensors = _hook_config(job, CollectionConfigurations=[relu_input])
    job.set_hyperparameters(FAST, mixed_precision="bf16", epochs=1)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert job.report("profile.json")["setup"]["precision"] == "bfloat16"
    assert "off for the rest of the job" not in run.stderr
    trial = create_trial(str(tensors))
    names = trial.tensor_names(collection="relu_input")
    assert names
    assert str(trial.tensor(names[0]).value(0, mode=modes.TRAIN).dtype) == "float32"


def test_a_hook_config_wins_over_save_tensors(debugged: tuple[Job, TrainRun, Path]) -> None:
    job, run, _ = debugged
    assert "save_tensors ignored: " in run.stderr
    assert not job.opt_ml.debug_tensors_dir.exists()


def test_smdebug_failing_while_training_does_not_fail_the_job(job: Job) -> None:
    """smdebug's own error handler turns it off at its first write; the job goes on."""
    _hook_config(job, LocalPath="/proc/no-such-dir/tensors")
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert job.failure() is None
    assert (job.opt_ml.model_dir / "model.pt").exists()
    assert run.metric("epoch") == [1, 2]
    assert "SageMaker Debugger on: writing tensors to /proc/no-such-dir/tensors" in run.stderr
    # smdebug's own log line (its logger writes to stdout).
    assert "disabling SMDebug for the rest of the training job" in run.stdout


def _off_because(config: Path, caplog: pytest.LogCaptureFixture) -> str:
    """create_hook's answer to `config` is no hook; the reason it logs."""
    with caplog.at_level(logging.INFO, logger="container.training.debugger"):
        assert create_hook(config, build("resnet18", 4), nn.CrossEntropyLoss()) is None
    (reason,) = [r.getMessage() for r in caplog.records if r.name == "container.training.debugger"]
    return reason


def test_a_config_file_pointing_nowhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "no" / "such.json"
    assert _off_because(config, caplog) == (
        f"SageMaker Debugger off: no {config} (save_tensors=true records tensors without it)"
    )


def test_malformed_hook_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "debughookconfig.json"
    config.write_text("{not json")
    reason = _off_because(config, caplog)
    assert reason.startswith("SageMaker Debugger off: it could not start (JSONDecodeError: ")


def test_unknown_collection_parameters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "debughookconfig.json"
    often = {"CollectionName": "losses", "CollectionParameters": {"save_interval": "often"}}
    config.write_text(json.dumps({**HOOK_CONFIG, "CollectionConfigurations": [often]}))
    # smdebug raises ValueError for "often"; after an earlier hook in the same process it may
    # fail another way first (its state is global): either way, no hook.
    reason = _off_because(config, caplog)
    assert reason.startswith("SageMaker Debugger off: it could not start (")


def test_smdebug_that_fails_to_import(tmp_path: Path) -> None:
    """In a process of its own, whose smdebug is a broken package."""
    fake = tmp_path / "site" / "smdebug"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("smdebug is broken in this image")\n')
    config = tmp_path / "debughookconfig.json"
    config.write_text(json.dumps(HOOK_CONFIG))
    code = """
import logging, sys
from pathlib import Path
from torch import nn
from container.model import build
from container.training.debugger import create_hook

logging.basicConfig(level=logging.INFO)
sys.exit(create_hook(Path(sys.argv[1]), build("resnet18", 4), nn.CrossEntropyLoss()) is not None)
"""
    run = subprocess.run(
        [sys.executable, "-c", code, str(config)],
        env={**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert (
        "SageMaker Debugger off: it could not start (ImportError: smdebug is broken in this image)"
        in run.stderr
    )


def test_save_tensors_saves_gradients_a_bounded_number_of_times() -> None:
    """Every step for short jobs, a multiple of SAVE_INTERVAL (steps that nest with the job's
    own rule records) for long ones, and never more than 100 saves."""
    steps = (1, 4, 100, 101, 1000, 1001, 1250, 20_000)
    assert [own_save_interval(n) for n in steps] == [1, 1, 1, 10, 10, 20, 20, 200]
    for n in range(1, 30_000, 13):
        interval = own_save_interval(n)
        assert math.ceil(n / interval) <= 100
        assert interval == 1 or interval % SAVE_INTERVAL == 0
