"""SageMaker's GPU hosts, the NVIDIA driver each gets, and which CUDA builds those drivers run.

One table for `launch` (which AMI to ask for), `serve` and `train` (what to tell a user whose GPU
the image cannot use). Torch-free: `launch` imports it on a laptop.

Sources:
- AWS docs, "Best practices to minimize interruptions during GPU driver upgrades"
  (sagemaker/latest/dg/inference-gpu-drivers.html): with no AMI named, real-time, asynchronous and
  batch hosts of ml.p2, p3, p4d, p4de, g4dn and g5 run driver 470 (CUDA 11.4); ml.p5 and g6 run
  535 (CUDA 12.2); ml.p5e and p5en run 550 (CUDA 12.4). "SageMaker AI doesn't automatically apply
  AMI overrides": the endpoint config (`ProductionVariant.InferenceAmiVersion`) or the transform
  job (`TransformResources.TransformAmiVersion`) must name one.
- SageMaker API reference, ProductionVariant.InferenceAmiVersion and
  TransformResources.TransformAmiVersion: each AMI's driver and CUDA version.
- NVIDIA, "CUDA Compatibility" (minor version compatibility): a CUDA 11.x build runs on driver
  >= 450.80.02, 12.x on >= 525.60.13, 13.x on >= 580.65.06.
- NVIDIA's driver release notes: the K80 (ml.p2) is not supported after the 470 branch; the H200
  (ml.p5e, p5en) needs 550 or later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CPU",
    "DEFAULT_IMAGE_CUDA",
    "IMAGE_CUDA_LABEL",
    "INFERENCE_AMIS",
    "TRANSFORM_AMIS",
    "Ami",
    "DriverError",
    "GpuFamily",
    "ami_line",
    "check_cuda",
    "choose_ami",
    "driver_advice",
    "gpu_family",
    "markdown_table",
    "min_driver",
    "refuse_ami",
]

IMAGE_CUDA_LABEL = "sagemaker-dog-classifier.cuda"
"""The image label holding the CUDA version of its torch build ("12.6"), or `CPU`; set at build."""
CPU = "cpu"
DEFAULT_IMAGE_CUDA = "12.6"
"""The Dockerfile's TORCH_CUDA default: what an image without the label is taken to be built for."""

_MIN_DRIVER = {11: 450, 12: 525, 13: 580}
"""CUDA major version -> the oldest driver branch that runs it (minor version compatibility)."""


class DriverError(ValueError):
    """Raised when no driver a host can have runs the image's CUDA, or a named AMI is too old."""


@dataclass(frozen=True)
class Ami:
    """A host AMI SageMaker offers, and the driver it pins."""

    name: str
    driver: int
    cuda: str
    note: str = ""


INFERENCE_AMIS = (
    Ami("al2-ami-sagemaker-inference-gpu-2", 535, "12.2"),
    Ami("al2-ami-sagemaker-inference-gpu-2-1", 535, "12.2", "CUDA-compat mounting disabled"),
    Ami("al2-ami-sagemaker-inference-gpu-3-1", 550, "12.4", "CUDA-compat mounting disabled"),
    Ami("al2023-ami-sagemaker-inference-gpu-4-1", 580, "13.0"),
)
"""ProductionVariant.InferenceAmiVersion values for NVIDIA GPUs, oldest driver first."""

TRANSFORM_AMIS = (
    Ami("al2-ami-sagemaker-batch-gpu-470", 470, "11.4"),
    Ami("al2-ami-sagemaker-batch-gpu-535", 535, "12.2"),
)
"""TransformResources.TransformAmiVersion values, oldest driver first."""


@dataclass(frozen=True)
class GpuFamily:
    """An ml.* instance family with NVIDIA GPUs."""

    name: str
    gpu: str
    default_driver: int | None
    """The driver a host gets when no AMI is named (None: not in AWS's table)."""
    min_driver: int = 0
    """The oldest driver that supports the GPU."""
    max_driver: int | None = None
    """The newest driver that supports the GPU (None: current drivers do)."""


_FAMILIES = {
    family.name: family
    for family in (
        GpuFamily("p2", "K80", 470, max_driver=470),
        GpuFamily("p3", "V100", 470),
        GpuFamily("g4dn", "T4", 470),
        GpuFamily("g5", "A10G", 470),
        GpuFamily("p4d", "A100", 470),
        GpuFamily("p4de", "A100 80GB", 470),
        GpuFamily("g6", "L4", 535, min_driver=525),
        GpuFamily("g6e", "L40S", None, min_driver=535),
        GpuFamily("p5", "H100", 535, min_driver=525),
        GpuFamily("p5e", "H200", 550, min_driver=550),
        GpuFamily("p5en", "H200", 550, min_driver=550),
    )
}


def gpu_family(instance_type: str) -> GpuFamily | None:
    """The NVIDIA GPU family of an ml.* instance type ("ml.g4dn.xlarge"), None for CPU types."""
    parts = instance_type.split(".")
    if len(parts) != 3 or parts[0] != "ml":
        return None
    return _FAMILIES.get(parts[1])


def min_driver(cuda: str) -> int:
    """The oldest driver branch that runs a CUDA version ("12.6" -> 525)."""
    major = int(cuda.split(".")[0])
    if major not in _MIN_DRIVER:
        raise DriverError(f"CUDA {cuda}: no known driver requirement (known: 11.x, 12.x, 13.x)")
    return _MIN_DRIVER[major]


def _fits(ami: Ami, family: GpuFamily, needed: int) -> bool:
    top = family.max_driver
    return ami.driver >= max(needed, family.min_driver) and (top is None or ami.driver <= top)


def choose_ami(amis: tuple[Ami, ...], instance_type: str, cuda: str) -> Ami:
    """The oldest-driver AMI that runs `cuda` on `instance_type` (DriverError when none does)."""
    family = gpu_family(instance_type)
    if family is None:
        raise DriverError(f"{instance_type} has no NVIDIA GPU: it takes no GPU AMI")
    needed = min_driver(cuda)
    for ami in amis:
        if _fits(ami, family, needed):
            return ami
    offered = ", ".join(f"{a.name} (driver {a.driver})" for a in amis)
    raise DriverError(
        f"no AMI runs this image's CUDA {cuda} (driver {needed}+) on {instance_type} "
        f"({family.gpu}): SageMaker offers {offered}; use another instance type (a CPU type runs "
        "any build) or an image built for an older CUDA"
    )


def refuse_ami(amis: tuple[Ami, ...], name: str, instance_type: str, cuda: str) -> Ami:
    """The named AMI, if it runs `cuda` on `instance_type`; else DriverError saying what to pick."""
    by_name = {ami.name: ami for ami in amis}
    if name not in by_name:
        raise DriverError(f"unknown AMI {name!r}: use one of {', '.join(by_name)}")
    ami = by_name[name]
    family = gpu_family(instance_type)
    if family is None:
        raise DriverError(f"{instance_type} has no NVIDIA GPU: drop the AMI {name}")
    if not _fits(ami, family, min_driver(cuda)):
        better = choose_ami(amis, instance_type, cuda)
        raise DriverError(
            f"{name} has driver {ami.driver} (CUDA {ami.cuda}), which cannot run this image's "
            f"CUDA {cuda} on {instance_type}: use {better.name} (driver {better.driver})"
        )
    return ami


def driver_advice(cuda: str) -> str:
    """What to choose on SageMaker so that a host's driver runs an image built for `cuda`."""
    needed = min_driver(cuda)
    inference = next((a.name for a in INFERENCE_AMIS if a.driver >= needed), None)
    transform = next((a.name for a in TRANSFORM_AMIS if a.driver >= needed), None)
    parts = [f"CUDA {cuda} needs NVIDIA driver {needed} or later"]
    if inference:
        parts.append(f"endpoints: InferenceAmiVersion={inference} (launch deploy sets it)")
    if transform:
        parts.append(f"batch transform: TransformAmiVersion={transform}")
    else:
        parts.append("batch transform: no AMI has that driver, use a CPU instance")
    return "; ".join(parts)


def check_cuda(value: str) -> str:
    """An image's CUDA label value as given ("12.6", "13.0" or "cpu"); DriverError if it is none."""
    if value != CPU and not re.fullmatch(r"[0-9]+\.[0-9]+", value):
        raise DriverError(f"CUDA {value!r}: give a version such as {DEFAULT_IMAGE_CUDA}, or {CPU}")
    if value != CPU:
        min_driver(value)
    return value


def _default_driver(family: GpuFamily) -> str:
    if family.default_driver is None:
        return "no documented default driver"
    cuda = {a.driver: a.cuda for a in (*TRANSFORM_AMIS, *INFERENCE_AMIS)}.get(family.default_driver)
    return f"driver {family.default_driver}" + (f" (CUDA {cuda})" if cuda else "")


def ami_line(field: str, ami: Ami, instance_type: str, cuda: str) -> str:
    """Why `ami` was chosen, in one line: what the host gets by default and what the image needs
    ("ml.g4dn.xlarge (T4) would get driver 470 (CUDA 11.4) by default; ...")."""
    family = gpu_family(instance_type)
    if family is None:
        raise DriverError(f"{instance_type} has no NVIDIA GPU: it takes no GPU AMI")
    default = _default_driver(family)
    host = (
        f"{instance_type} ({family.gpu}) has {default}"
        if family.default_driver is None
        else f"{instance_type} ({family.gpu}) would get {default} by default"
    )
    return (
        f"{host}; this image needs CUDA {cuda} -> driver {min_driver(cuda)}+: "
        f"{field}={ami.name} (driver {ami.driver})"
    )


def _cell(amis: tuple[Ami, ...], instance_type: str, cuda: str) -> str:
    try:
        return f"`{choose_ami(amis, instance_type, cuda).name}`"
    except DriverError:
        return "none: use a CPU type"


def markdown_table(cudas: tuple[str, ...] = (DEFAULT_IMAGE_CUDA, "13.0")) -> str:
    """The table of docs/image.md: each GPU family, its default driver, and the AMI `launch` picks
    for an image built for each CUDA in `cudas`."""
    head = ["family", "GPU", "with no AMI"]
    for cuda in cudas:
        head += [f"endpoint, CUDA {cuda}", f"batch transform, CUDA {cuda}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family in _FAMILIES.values():
        instance_type = f"ml.{family.name}.xlarge"
        row = [f"ml.{family.name}", family.gpu, _default_driver(family)]
        for cuda in cudas:
            row += [
                _cell(INFERENCE_AMIS, instance_type, cuda),
                _cell(TRANSFORM_AMIS, instance_type, cuda),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
