"""What a process can compute on: native bf16 on the CPU, and the GPU stack, for logs.

Shared by `train` and `serve`: both print the driver and CUDA versions at start (CONTRACT.md §1.5)
and both choose bf16 on CPUs that have bf16 units.
"""

from __future__ import annotations

from pathlib import Path

import pynvml
import torch

__all__ = ["cpu_has_bf16", "describe_cuda"]


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX); without them bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _driver_version() -> str:
    try:
        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except pynvml.NVMLError as exc:
        return f"unknown ({exc})"


def describe_cuda() -> str:
    """Driver, CUDA runtime and devices, for the job's first log lines (CONTRACT.md §1.5)."""
    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
    if not torch.cuda.is_available():
        return f"no usable GPU ({build}, NVIDIA driver {_driver_version()})"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"{build}, NVIDIA driver {_driver_version()}, devices: {names}"
