"""The job's own profile: where each epoch's time went, throughput, and how busy the machine was.

SageMaker's framework profiler does not support PyTorch 2 (docs/sagemaker-contract.md §3.4), so the
loop times its phases itself and a background thread samples CPU, memory and GPU use. Each training
step's duration is kept too (one float per step), and the time from the process's start to the first
step: what SageMaker's StepOutlier and MaxInitializationTime rules look at. `findings` judges the
result; `reports` turns it into profile.json and profile.html.

What a phase's seconds are depends on the device (`timing`). On the CPU, the host's clock. On a GPU,
the device's timeline between CUDA events marked at the phase's ends, read once per epoch without
waiting for the GPU in between: forward_backward and optimizer are the GPU's time for their work;
data (waiting for a batch) is the time the GPU sat idle for want of one, so it is near zero while
the loader keeps ahead of the GPU, however long the host itself waits; evaluation and checkpoint
start with the GPU idle and end by waiting for their results, so theirs is their wall time. A
step's time (`step_s`) is on the same timeline as its phases, so they add up alike on both devices.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import pynvml
import torch

from container.training.timing import Timeline, clock_for

__all__ = ["PHASES", "EpochProfile", "Profiler", "SystemSample"]

PHASES = ("data", "forward_backward", "optimizer", "evaluation", "checkpoint")
"""Where an epoch's time goes; `data` is time spent waiting for the next batch (on a GPU, the
GPU's: see the module's docstring)."""


@dataclass(frozen=True)
class SystemSample:
    t: float
    cpu_percent: float
    rss_mb: float
    memory_percent: float
    gpu_percent: float | None
    gpu_memory_mb: float | None
    cpu_max_core_percent: float = 0.0  # the busiest core: one saturated core hides in the mean


def _images_per_sec(seconds: dict[str, float], train_images: int) -> float:
    """Training throughput: waiting for data, forward/backward and optimiser steps count."""
    busy = seconds["data"] + seconds["forward_backward"] + seconds["optimizer"]
    return train_images / busy if busy > 0 else 0.0


@dataclass
class EpochProfile:
    epoch: int
    seconds: dict[str, float]
    train_images: int
    wall_s: float
    # Each training step, from the end of the step before: data wait and loss checks included.
    step_s: list[float] = field(default_factory=list)

    @property
    def images_per_sec(self) -> float:
        return _images_per_sec(self.seconds, self.train_images)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_sec": self.images_per_sec}


class _Gpu:
    def __init__(self, device: torch.device) -> None:
        self.handle: Any = None
        self.total_mb: float | None = None
        if device.type != "cuda":
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.total_mb = pynvml.nvmlDeviceGetMemoryInfo(self.handle).total / 2**20
        except pynvml.NVMLError:
            self.handle = None  # no NVML on this host: GPU use is left out of the report

    def sample(self) -> tuple[float | None, float | None]:
        if self.handle is None:
            return None, None
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(self.handle)
        except pynvml.NVMLError:
            return None, None
        return float(util.gpu), memory.used / 2**20


@dataclass
class Profiler:
    """Phase timers for the loop and a sampler thread for the machine."""

    device: torch.device
    interval_s: float = 1.0
    epochs: list[EpochProfile] = field(default_factory=list)
    samples: list[SystemSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._timeline = Timeline(clock_for(self.device))
        self._epoch_start = time.monotonic()
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._gpu = _Gpu(self.device)
        self._process = psutil.Process()
        # With several processes per host this one was started a moment after `train` was.
        self._process_start = self._process.create_time()
        self._first_step: float | None = None  # wall clock (time.time) at the first step
        self._thread = threading.Thread(target=self._sample_loop, name="profiler", daemon=True)

    def start(self) -> None:
        psutil.cpu_percent(None)  # the first reading is meaningless; prime it
        psutil.cpu_percent(None, percpu=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _rss_mb(self) -> float:
        # The loader workers are child processes: count them too.
        total = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return float(total) / 2**20

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            gpu, gpu_memory = self._gpu.sample()
            self.samples.append(
                SystemSample(
                    t=round(time.monotonic() - self._start, 3),
                    cpu_percent=psutil.cpu_percent(None),
                    cpu_max_core_percent=max(psutil.cpu_percent(None, percpu=True), default=0.0),
                    rss_mb=round(self._rss_mb(), 1),
                    memory_percent=psutil.virtual_memory().percent,
                    gpu_percent=gpu,
                    gpu_memory_mb=gpu_memory,
                )
            )

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Time a phase, without waiting for the GPU (its seconds are read at the epoch's end)."""
        return self._timeline.phase(name)

    def start_steps(self) -> None:
        """The training loop is about to wait for its first batch of the epoch."""
        if self._first_step is None:
            self._first_step = time.time()
        self._timeline.start_steps()

    def end_step(self) -> None:
        """A training step ended: its duration (batch wait included) is kept for the epoch."""
        self._timeline.end_step()

    def images_per_sec(self, train_images: int) -> float:
        """Training throughput of the epoch in progress, so far (on a GPU, waits for it)."""
        self._timeline.settle()
        return _images_per_sec(self._timeline.seconds, train_images)

    def end_epoch(self, epoch: int, train_images: int) -> EpochProfile:
        """Close the epoch's accounts (on a GPU, one wait for its last phase)."""
        seconds, steps = self._timeline.take()
        now = time.monotonic()
        profile = EpochProfile(
            epoch=epoch,
            seconds={name: round(seconds.get(name, 0.0), 4) for name in PHASES},
            train_images=train_images,
            wall_s=round(now - self._epoch_start, 4),
            step_s=steps,
        )
        self.epochs.append(profile)
        self._epoch_start = now
        return profile

    def to_json(self) -> dict[str, Any]:
        first = self._first_step
        return {
            "device": str(self.device),
            "initialization_s": None if first is None else round(first - self._process_start, 3),
            "gpu_memory_total_mb": self._gpu.total_mb,
            "epochs": [e.to_json() for e in self.epochs],
            "samples": [asdict(s) for s in self.samples],
        }
