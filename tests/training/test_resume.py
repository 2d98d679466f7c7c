"""Checkpoints that survive kills, SIGTERM within SageMaker's window, and exact resumption."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import torch

from container.training.checkpoint import CHECKPOINT_FILE
from tests.conftest import FAST, Job, TrainRun, wait_for_line

# SageMaker sends SIGKILL 120 s after SIGTERM (CONTRACT.md §2.3).
STOP_WINDOW_S = 120


def _finish(process: subprocess.Popen[str], timeout: float) -> TrainRun:
    stdout, stderr = process.communicate(timeout=timeout)
    return TrainRun(process.returncode, stdout, stderr)


def _checkpoint(job: Job) -> dict[str, object]:
    state: dict[str, object] = torch.load(
        job.base / "checkpoints" / CHECKPOINT_FILE, weights_only=True
    )
    return state


def test_sigkill_then_restart_resumes_from_the_last_checkpoint(job: Job) -> None:
    job.set_hyperparameters(FAST, epochs=4)
    process = job.start()
    wait_for_line(process, "Epoch 3/4")  # epochs 1 and 2 are checkpointed by now
    process.kill()
    process.communicate(timeout=30)
    assert _checkpoint(job)["epoch"] == 2

    rerun = job.run()
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming from" in rerun.stderr
    assert rerun.metric("epoch") == [3, 4]
    assert job.meta()["epochs_completed"] == 4
    history = job.report("evaluation.json")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


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


def _final_state(job: Job) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    checkpoint = _checkpoint(job)
    history = checkpoint["history"]
    model = checkpoint["model"]
    assert isinstance(history, list)
    assert isinstance(model, dict)
    return history, model


def test_resuming_is_exact(job: Job, tmp_path: Path) -> None:
    """Three epochs in one go, or two and then one more from the checkpoint: the same run.

    Model, optimiser (momentum), scheduler, epoch counter and RNG (augmentation) all come back
    from the checkpoint, so the third epoch is bit-for-bit the same.
    """
    settings = {**FAST, "lr_schedule": "constant", "augment": True}
    job.set_hyperparameters(settings, epochs=3)
    straight = job.run()
    assert straight.returncode == 0, straight.stderr
    expected_history, expected_model = _final_state(job)

    for file in (job.base / "checkpoints").iterdir():
        file.unlink()
    job.set_hyperparameters(settings, epochs=2)
    assert job.run().returncode == 0
    job.set_hyperparameters(settings, epochs=3)
    resumed = job.run()
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.metric("epoch") == [3]
    history, model = _final_state(job)

    drop = ("images_per_sec",)  # wall-clock, not state
    assert [{k: v for k, v in h.items() if k not in drop} for h in history] == [
        {k: v for k, v in h.items() if k not in drop} for h in expected_history
    ]
    for key, value in expected_model.items():
        assert torch.equal(model[key], value), key
