"""A training job on a GPU instance type whose GPU CUDA cannot use fails at once (this machine has
no NVIDIA driver, so resourceconfig.json naming ml.g4dn.xlarge is exactly that host), unless the
`device` hyperparameter says cpu."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from container.devices import DeviceChoice
from container.training.errors import ResourceError
from container.training.hardware import Hardware, plan_hardware
from tests.conftest import Job, fails_with


def _plan(device_choice: DeviceChoice, instance_type: str | None) -> Hardware:
    return plan_hardware(
        device_choice=device_choice,
        instance_type=instance_type,
        local_rank=0,
        local_world_size=1,
        precision="off",
        workers=0,
        batch_bytes=0,
    )


def test_a_gpu_instance_type_without_usable_cuda_fails_before_loading_data(job: Job) -> None:
    job.write_config(
        "resourceconfig.json",
        {"current_host": "algo-1", "hosts": ["algo-1"], "current_instance_type": "ml.g4dn.xlarge"},
    )
    shutil.rmtree(job.opt_ml.data_dir)  # reading the channels would fail with a DataError
    fails_with(
        job,
        "ResourceError: ml.g4dn.xlarge has T4 GPUs, but CUDA cannot use them",
        "no NVIDIA driver found",
        f"this image's torch is built for CUDA {torch.version.cuda}",
        "needs NVIDIA driver",
        "set the hyperparameter device=cpu",
    )


def test_device_cuda_fails_without_a_usable_gpu_whatever_the_instance() -> None:
    with pytest.raises(ResourceError) as raised:
        _plan("cuda", None)
    message = str(raised.value)
    assert message.startswith("no usable GPU: no NVIDIA driver found")
    assert "device=cpu" in message


def test_device_cpu_trains_on_a_gpu_instance_type(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        hardware = _plan("cpu", "ml.g4dn.xlarge")
    assert hardware.device == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
