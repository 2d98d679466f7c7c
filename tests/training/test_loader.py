"""Loader workers: sized from /dev/shm, and a dead worker does not end the job."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from container.training.distributed import Rank
from container.training.loader import LoaderSettings, train_batches
from tests.conftest import FAST, ROOT, Job, wait_for_line

# Docker's default /dev/shm is 64 MB; this is smaller still, in a mount namespace of its own.
SMALL_SHM = [
    "unshare",
    "--mount",
    "sh",
    "-c",
    'mount -t tmpfs -o size=4m tmpfs /dev/shm && exec "$@"',
    "-",
]


def test_small_shared_memory_means_fewer_workers_not_a_bus_error() -> None:
    """The loader plan of a process that sees only that /dev/shm (no training needed)."""
    # 224 px batches of 8 are 1.2 MB of uint8; two in flight per worker do not fit in half of 4 MB.
    code = """
import logging
from container.training.hardware import plan_hardware

logging.basicConfig(level=logging.INFO)
hardware = plan_hardware(
    device_choice="cpu",
    instance_type=None,
    local_rank=0,
    local_world_size=1,
    precision="off",
    workers=2,
    batch_bytes=8 * 224 * 224 * 3,
)
print(hardware.workers)
"""
    run = subprocess.run(
        [*SMALL_SHM, sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "0\n"
    assert "/dev/shm has 4 MB free, enough for 0 of 2 loader workers; using 0" in run.stderr


def test_a_killed_loader_worker_does_not_end_the_epoch(job: Job) -> None:
    job.set_hyperparameters(FAST, image_size=64, batch_size=2, workers=2, epochs=2)
    process = job.start()
    wait_for_line(process, "Epoch 1/2")
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    while not (workers := parent.children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers[0].send_signal(signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "continuing this epoch without loader workers" in stderr
    assert job.report("profile.json")["epochs"][0]["train_images"] == 64
    assert [line.split()[0] for line in stdout.splitlines()][:2] == ["epoch=1", "epoch=2"]


class _BrokenHandOver(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fails in a loader worker the way a worker killed mid hand-over looks to the parent."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if get_worker_info() is not None:
            raise EOFError
        return torch.full((2,), float(index)), torch.tensor(index)


def test_a_broken_worker_hand_over_falls_back_to_loading_in_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rank = Rank(rank=0, local_rank=0, world_size=1, local_world_size=1)
    settings = LoaderSettings(batch_size=2, workers=1, pin_memory=False, seed=0, rank=rank)
    batches = list(train_batches(_BrokenHandOver(), settings, epoch=0, start_step=1))
    assert len(batches) == 3
    assert sorted(int(i) for _, labels in batches for i in labels) == sorted(
        int(i) for i in list(DistributedSampler(_BrokenHandOver(), 1, 0, seed=0))[2:]
    )
    assert "A loader worker died (EOFError: " in caplog.text
