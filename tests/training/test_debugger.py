"""SageMaker Debugger: tensors readable with smdebug's trial API, and never able to fail a job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from smdebug import modes
from smdebug.trials import create_trial

from container.training.debugger import SAVE_INTERVAL, own_save_interval
from tests.conftest import FAST, Job

HOOK_CONFIG = {
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


def test_tensors_are_readable_with_the_trial_api(job: Job) -> None:
    tensors = _hook_config(job)
    run = job.run()
    assert run.returncode == 0, run.stderr
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
    tensors = _hook_config(
        job,
        CollectionConfigurations=[
            {
                "CollectionName": "relu_input",
                "CollectionParameters": {"include_regex": ".*relu_input"},
            }
        ],
    )
    job.set_hyperparameters(FAST, mixed_precision="bf16", epochs=1)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert "off for the rest of the job" not in run.stderr
    trial = create_trial(str(tensors))
    names = trial.tensor_names(collection="relu_input")
    assert names
    assert str(trial.tensor(names[0]).value(0, mode=modes.TRAIN).dtype) == "float32"


def _completes_without_debugger(job: Job, reason: str, env: dict[str, str] | None = None) -> None:
    run = job.run(env)
    assert run.returncode == 0, run.stderr
    assert job.failure() is None
    assert (job.opt_ml.model_dir / "model.pt").exists()
    assert len(run.metric("epoch")) == 2
    assert reason in run.stderr


def test_config_file_pointing_nowhere(job: Job, tmp_path: Path) -> None:
    env = {"SMDEBUG_CONFIG_FILE_PATH": str(tmp_path / "no" / "such.json")}
    _completes_without_debugger(job, "SageMaker Debugger off: no ", env)


def test_tensor_folder_that_cannot_be_written(job: Job) -> None:
    _hook_config(job, LocalPath="/proc/no-such-dir/tensors")
    _completes_without_debugger(job, "SageMaker Debugger")


def test_malformed_hook_config(job: Job) -> None:
    job.write_config("debughookconfig.json", "{not json")
    _completes_without_debugger(job, "SageMaker Debugger off: it could not start")


def test_unknown_collection_parameters(job: Job) -> None:
    _hook_config(
        job,
        CollectionConfigurations=[
            {"CollectionName": "losses", "CollectionParameters": {"save_interval": "often"}}
        ],
    )
    _completes_without_debugger(job, "SageMaker Debugger")


def test_smdebug_that_fails_to_import(job: Job, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "smdebug"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("smdebug is broken in this image")\n')
    _hook_config(job)
    _completes_without_debugger(
        job,
        "SageMaker Debugger off: it could not start (ImportError: smdebug is broken",
        env={"PYTHONPATH": str(tmp_path / "site")},
    )


@pytest.mark.parametrize("setting", ["off"])
def test_debugger_hyperparameter_turns_it_off(job: Job, setting: str) -> None:
    tensors = _hook_config(job)
    job.set_hyperparameters(FAST, debugger=setting)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert not tensors.exists()
    assert json.loads(job.opt_ml.debughookconfig_file.read_text())["LocalPath"] == str(tensors)


def test_save_tensors_saves_gradients_a_bounded_number_of_times() -> None:
    """Every step for short jobs, a multiple of SAVE_INTERVAL (steps that nest with the job's
    own rule records) for long ones, and never more than 100 saves."""
    steps = (1, 4, 100, 101, 1000, 1001, 1250, 20_000)
    assert [own_save_interval(n) for n in steps] == [1, 1, 1, 10, 10, 20, 20, 200]
    for n in range(1, 30_000, 13):
        interval = own_save_interval(n)
        assert math.ceil(n / interval) <= 100
        assert interval == 1 or interval % SAVE_INTERVAL == 0
