"""What the machine offers this process: device, mixed precision, CPU threads, loader workers."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from container.devices import CudaUnusableError, DeviceChoice, cpu_has_bf16, resolve_device
from container.training.errors import ResourceError

__all__ = ["Hardware", "plan_hardware"]

logger = logging.getLogger(__name__)

PrecisionMode = Literal["auto", "off", "bf16", "fp16"]

_SHM = Path("/dev/shm")
_MAX_WORKERS = 8
_PREFETCH = 2  # DataLoader's default prefetch_factor


@dataclass(frozen=True)
class Hardware:
    """Resolved once per process; everything below takes it as given."""

    device: torch.device
    amp_dtype: torch.dtype | None
    grad_scaler: bool
    threads: int
    workers: int

    @property
    def precision(self) -> str:
        return "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")


def _amp_dtype(mode: PrecisionMode, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def _shm_free() -> int | None:
    try:
        return shutil.disk_usage(_SHM).free
    except OSError:
        return None


def _auto_workers(cpus: int, device: torch.device) -> int:
    """Loader worker processes worth having.

    Batches are always loaded on a background thread of the training process, so decoding already
    overlaps compute. On a GPU the CPUs have nothing else to do: all but one decode (at most 8).
    On a CPU the model needs the cores itself; measured on 2 cores, two workers made training ~25%
    slower than none (bench/train_throughput.py, docs/benchmarks.md), so workers start at 8 cores.
    """
    if device.type == "cuda":
        return max(1, min(cpus - 1, _MAX_WORKERS))
    return min(cpus // 8, _MAX_WORKERS)


def _workers(
    requested: int | Literal["auto"], cpus: int, device: torch.device, batch_bytes: int
) -> int:
    """Loader workers: as asked or `_auto_workers`, fewer if /dev/shm is small.

    Docker's default 64 MB /dev/shm kills workers with "Bus error" (docs/sagemaker-contract.md
    §2.8); batches are uint8, so a few workers fit even there, and none are used when not even one
    fits.
    """
    wanted = _auto_workers(cpus, device) if requested == "auto" else requested
    free = _shm_free()
    if free is None or wanted == 0:
        return wanted
    # Each worker keeps `_PREFETCH` batches in flight; leave half of /dev/shm for everything else.
    fits = int(free // 2 // (batch_bytes * _PREFETCH))
    if fits < wanted:
        logger.warning(
            "/dev/shm has %d MB free, enough for %d of %d loader workers; using %d "
            "(run docker with --shm-size=1g for more)",
            free >> 20,
            fits,
            wanted,
            min(fits, wanted),
        )
    return min(fits, wanted)


def plan_hardware(
    *,
    device_choice: DeviceChoice,
    instance_type: str | None,
    local_rank: int,
    local_world_size: int,
    precision: PrecisionMode,
    workers: int | Literal["auto"],
    batch_bytes: int,
) -> Hardware:
    """Pick the device for `local_rank` and split this host's CPUs between its processes.

    ResourceError when the job must have a GPU (`device=cuda`, or a GPU instance type) that CUDA
    cannot use: failing at once beats hours of CPU training on a GPU bill.
    """
    try:
        device = resolve_device(device_choice, instance_type=instance_type, index=local_rank)
    except CudaUnusableError as exc:
        raise ResourceError(
            f"{exc}; {exc.probe.needs()}. To train on the CPU anyway (slowly, the GPU still "
            "billed), set the hyperparameter device=cpu; or use a CPU instance type"
        ) from exc
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cpus = max(1, len(os.sched_getaffinity(0)) // local_world_size)
    amp = _amp_dtype(precision, device)
    if amp is not None and device.type == "cpu" and not cpu_has_bf16():
        logger.warning("mixed_precision=%s on a CPU without native bf16 will be slow", precision)
    return Hardware(
        device=device,
        amp_dtype=amp,
        grad_scaler=amp is torch.float16 and device.type == "cuda",
        threads=cpus,
        workers=_workers(workers, cpus, device, batch_bytes),
    )
