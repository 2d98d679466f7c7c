"""What a process can compute on: native bf16 on the CPU, the GPU stack, and the one device choice.

Shared by `train` and `serve`: both print the driver and CUDA versions at start
(docs/sagemaker-contract.md §1.3), both choose bf16 on CPUs that have bf16 units, and both choose
their device in `resolve_device`.

That choice exists because a GPU host can hand the image a GPU its CUDA cannot use: SageMaker's
real-time and batch hosts of ml.g4dn, g5 and p4d run NVIDIA driver 470 (CUDA 11.4) unless an AMI is
named (container/gpu_drivers.py has the sources), and torch built for CUDA 12 or 13 then reports no
GPU. Falling back to the CPU in silence bills a GPU for CPU speed, so the choice says why, and
fails where the caller asked for CUDA (SERVE_DEVICE=cuda, a training job on a GPU instance type).

Usable means what torch says (`torch.cuda.is_available()`): a driver older than the image's CUDA
needs is only the explanation, because CUDA's forward-compatibility package (which SageMaker mounts
on some AMIs) lets an old driver run a newer CUDA.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pynvml
import torch

from container.gpu_drivers import DriverError, driver_advice, gpu_family, min_driver

__all__ = [
    "CudaProbe",
    "CudaUnusableError",
    "DeviceChoice",
    "DeviceDecision",
    "choose_device",
    "cpu_has_bf16",
    "describe_cuda",
    "probe_cuda",
    "resolve_device",
]

logger = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cuda", "cpu"]
"""auto: the GPU when CUDA can use it, else the CPU; cuda: the GPU or an error; cpu: the CPU."""


class CudaUnusableError(RuntimeError):
    """Raised by `resolve_device` when CUDA is required (asked for, or the process runs on a GPU
    instance type) but torch cannot use a GPU; the message says why, `probe` what to choose."""

    def __init__(self, message: str, probe: CudaProbe) -> None:
        super().__init__(message)
        self.probe = probe


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units (AVX512-BF16 or AMX); without them bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class CudaProbe:
    """What this process found: the image's CUDA, the host's NVIDIA driver, and torch's verdict."""

    cuda: str | None
    """The CUDA version torch was built for (`torch.version.cuda`); None for a CPU-only build."""
    driver: str | None
    """The NVIDIA driver version NVML reports ("470.256.02"); None when there is none."""
    devices: int
    """NVIDIA devices NVML sees, whether or not torch can use them."""
    usable: bool
    """`torch.cuda.is_available()`."""
    detail: str = ""
    """NVML's and torch's own words on what is missing, when something is."""

    @property
    def present(self) -> bool:
        """An NVIDIA GPU is on this host (whether or not CUDA can use it)."""
        return self.devices > 0

    def problem(self) -> str:
        """Why CUDA is unusable, naming the driver and the image's CUDA."""
        detail = f" ({self.detail})" if self.detail else ""
        if self.cuda is None:
            return f"this image's torch is a CPU-only build{detail}"
        if self.driver is None:
            return (
                f"no NVIDIA driver found{detail}; this image's torch is built for CUDA {self.cuda}"
            )
        if _too_old(self.driver, self.cuda):
            return f"NVIDIA driver {self.driver} cannot run this image's CUDA {self.cuda}{detail}"
        return (
            f"torch cannot use the GPU with NVIDIA driver {self.driver} and this image's "
            f"CUDA {self.cuda}{detail}"
        )

    def needs(self) -> str:
        """What the image's CUDA asks of the host's driver (or, for a CPU-only torch, the build)."""
        if self.cuda is None:
            return "build the image with a CUDA torch (the Dockerfile's TORCH_INDEX_URL)"
        try:
            return f"CUDA {self.cuda} needs NVIDIA driver {min_driver(self.cuda)} or later"
        except DriverError as exc:
            return str(exc)

    def hosting_advice(self) -> str:
        """`needs`, and the SageMaker endpoint and batch-transform AMIs whose driver meets it."""
        if self.cuda is None:
            return self.needs()
        try:
            return driver_advice(self.cuda)
        except DriverError as exc:
            return str(exc)


def _too_old(driver: str, cuda: str) -> bool:
    branch = driver.split(".")[0]
    try:
        return branch.isdigit() and int(branch) < min_driver(cuda)
    except DriverError:
        return False


def _nvml() -> tuple[str | None, int, str]:
    """The driver version and device count NVML reports, or None, 0 and NVML's error."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, 0, f"NVML: {exc}"
    try:
        return str(pynvml.nvmlSystemGetDriverVersion()), int(pynvml.nvmlDeviceGetCount()), ""
    except pynvml.NVMLError as exc:
        return None, 0, f"NVML: {exc}"
    finally:
        pynvml.nvmlShutdown()


def _first_sentence(text: str) -> str:
    return text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else ""


def probe_cuda() -> CudaProbe:
    """Ask NVML for the driver and devices, and torch whether CUDA works here."""
    driver, devices, nvml_error = _nvml()
    with warnings.catch_warnings():
        # torch warns "CUDA initialization: the driver is too old"; the probe reports it instead.
        warnings.simplefilter("ignore")
        usable = torch.version.cuda is not None and torch.cuda.is_available()
    details = [nvml_error] if nvml_error else []
    if not usable and torch.version.cuda is not None:
        try:
            torch.cuda.init()  # type: ignore[no-untyped-call]  # raises with torch's reason
        except (RuntimeError, AssertionError) as exc:
            details.append(f"torch: {_first_sentence(str(exc))}")
    return CudaProbe(torch.version.cuda, driver, devices, usable, "; ".join(details))


@dataclass(frozen=True)
class DeviceDecision:
    """The device kind to use, and the ERROR line to log when a GPU is left unused by necessity."""

    kind: Literal["cuda", "cpu"]
    error: str | None = None


def choose_device(
    requested: DeviceChoice, probe: CudaProbe, instance_type: str | None = None
) -> DeviceDecision:
    """The device for `requested` given what `probe` found (pure: testable for any host).

    `instance_type` is the SageMaker instance type the process runs on, when known: on an NVIDIA
    GPU type (gpu_drivers.gpu_family) `auto` requires CUDA as `cuda` does. CudaUnusableError when
    CUDA is required but unusable.
    """
    if requested == "cpu":
        return DeviceDecision("cpu")
    if probe.usable:
        return DeviceDecision("cuda")
    family = gpu_family(instance_type) if instance_type else None
    if family is not None:
        raise CudaUnusableError(
            f"{instance_type} has {family.gpu} GPUs, but CUDA cannot use them: {probe.problem()}",
            probe,
        )
    if requested == "cuda":
        raise CudaUnusableError(f"no usable GPU: {probe.problem()}", probe)
    if probe.present:
        return DeviceDecision(
            "cpu",
            "NVIDIA GPU present but unusable, using the CPU: "
            f"{probe.problem()}. {probe.hosting_advice()}",
        )
    return DeviceDecision("cpu")


def resolve_device(
    requested: DeviceChoice, *, instance_type: str | None = None, index: int = 0
) -> torch.device:
    """The device this process computes on (`choose_device` on this host), logging one ERROR
    line when a present GPU is left unused; CudaUnusableError when CUDA is required but unusable.

    `index` picks the GPU (a training process's local rank, modulo the GPUs).
    """
    decision = choose_device(requested, probe_cuda(), instance_type)
    if decision.error:
        logger.error("%s", decision.error)
    if decision.kind == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", index % torch.cuda.device_count())


def describe_cuda() -> str:
    """Driver, CUDA runtime and devices, for the job's first log lines
    (docs/sagemaker-contract.md §1.3)."""
    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
    driver, _, nvml_error = _nvml()
    driver_text = driver or f"unknown ({nvml_error.removeprefix('NVML: ')})"
    if not torch.cuda.is_available():
        return f"no usable GPU ({build}, NVIDIA driver {driver_text})"
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"{build}, NVIDIA driver {driver_text}, devices: {names}"
