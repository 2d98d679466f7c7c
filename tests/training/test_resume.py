"""Checkpoints that survive kills, SIGTERM within SageMaker's window, and exact resumption."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from container.sagemaker_env import OptMl
from container.training.checkpoint import CHECKPOINT_FILE
from tests.conftest import FAST, Job, NewJob, TrainRun, wait_for_line

# SageMaker sends SIGKILL 120 s after SIGTERM (docs/sagemaker-contract.md §2.4).
STOP_WINDOW_S = 120

# Augmented, so resuming must restore the RNG too; a checkpoint every second epoch (and after the
# last), so a kill in epoch 3 resumes from the end of epoch 2.
EVERY_OTHER = {**FAST, "epochs": 3, "augment": True, "checkpoint_epochs": 2}


def _finish(process: subprocess.Popen[str], timeout: float) -> TrainRun:
    stdout, stderr = process.communicate(timeout=timeout)
    return TrainRun(process.returncode, stdout, stderr)


def _checkpoint(job: Job) -> dict[str, object]:
    state: dict[str, object] = torch.load(
        job.base / "checkpoints" / CHECKPOINT_FILE, weights_only=True
    )
    return state


def _final_state(job: Job) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """The checkpoint's history, less its wall-clock figures, and its model weights."""
    checkpoint = _checkpoint(job)
    history, model = checkpoint["history"], checkpoint["model"]
    assert isinstance(history, list)
    assert isinstance(model, dict)
    return [{k: v for k, v in row.items() if k != "images_per_sec"} for row in history], model


@pytest.fixture(scope="module")
def straight(jobs: NewJob) -> tuple[Job, TrainRun]:
    """Three epochs in one go: what a killed and resumed job must end up with."""
    job = jobs("straight", EVERY_OTHER)
    run = job.run()
    assert run.returncode == 0, run.stderr
    return job, run


def test_checkpoint_epochs_writes_last_pt_less_often(straight: tuple[Job, TrainRun]) -> None:
    """What the checkpoints finding recommends: every 2nd epoch, and always the last."""
    _, run = straight
    assert re.findall(r"Checkpoint saved after epoch (\d+)", run.stderr) == ["2", "3"]


def test_sigkill_then_restart_resumes_exactly(jobs: NewJob, straight: tuple[Job, TrainRun]) -> None:
    """Model, optimiser (momentum), scheduler, epoch counter and RNG (augmentation) all come back
    from the checkpoint, so the epoch after it is bit-for-bit the same as without the kill."""
    job = jobs("killed", EVERY_OTHER)
    process = job.start()
    wait_for_line(process, "Epoch 3/3")  # epoch 2 is checkpointed by now
    process.kill()
    process.communicate(timeout=30)
    assert _checkpoint(job)["epoch"] == 2

    rerun = job.run()
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming from" in rerun.stderr
    assert rerun.metric("epoch") == [3]
    assert job.meta()["epochs_completed"] == 3
    assert [h["epoch"] for h in job.report("evaluation.json")["history"]] == [1, 2, 3]

    expected_history, expected_model = _final_state(straight[0])
    history, model = _final_state(job)
    assert history == expected_history
    for key, value in expected_model.items():
        assert torch.equal(model[key], value), key


def test_a_finished_job_restarted_with_its_checkpoint_only_reports_again(
    straight: tuple[Job, TrainRun], tmp_path_factory: pytest.TempPathFactory
) -> None:
    done, first = straight
    job = Job(OptMl(tmp_path_factory.mktemp("restarted") / "opt_ml"))
    shutil.copytree(done.base, job.base)
    (job.opt_ml.model_dir / "model.pt").unlink()  # a new job: /opt/ml/model starts empty

    second = job.run()
    assert second.returncode == 0, second.stderr
    assert "Resuming from" in second.stderr
    assert second.metric("epoch") == []  # nothing left to train
    assert second.metric("val_acc") == first.metric("val_acc")[-1:]
    assert job.meta()["model_version"] == done.meta()["model_version"]


def test_sigterm_stops_in_time_with_checkpoint_and_model_then_resumes_mid_epoch(
    job: Job,
) -> None:
    # 64 px and batches of 4: 16 steps an epoch, so the signal lands inside the first epoch.
    job.set_hyperparameters(FAST, image_size=64, batch_size=4, epochs=2)
    process = job.start()
    wait_for_line(process, "Epoch 1/2: 16 steps")
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    stopped = _finish(process, timeout=STOP_WINDOW_S)
    assert time.monotonic() - sent < STOP_WINDOW_S
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM received" in stopped.stderr
    assert stopped.metric("epoch") == []
    checkpoint = _checkpoint(job)
    assert checkpoint["epoch"] == 0
    step = checkpoint["step"]
    assert isinstance(step, int)
    assert 1 <= step < 16
    assert (job.opt_ml.model_dir / "model.pt").exists()  # the model so far, for model.tar.gz
    assert job.meta()["epochs_completed"] == 0
    assert job.failure() is None

    resumed = job.run()
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {job.base / 'checkpoints'}: epoch 1, step {step}" in resumed.stderr
    assert f"Epoch 1/2: 16 steps from step {step}" in resumed.stderr
    assert resumed.metric("epoch") == [1, 2]
    assert job.report("profile.json")["epochs"][0]["train_images"] == 64 - 4 * step
