"""A training job on a GPU instance type whose GPU CUDA cannot use fails at once (this machine has
no NVIDIA driver, so resourceconfig.json naming ml.g4dn.xlarge is exactly that host), unless the
`device` hyperparameter says cpu."""

from __future__ import annotations

import shutil

import torch

from tests.conftest import FAST, Job
from tests.training.test_failures import _fails_with


def _on(job: Job, instance_type: str) -> None:
    job.write_config(
        "resourceconfig.json",
        {"current_host": "algo-1", "hosts": ["algo-1"], "current_instance_type": instance_type},
    )


def test_a_gpu_instance_type_without_usable_cuda_fails_before_loading_data(job: Job) -> None:
    _on(job, "ml.g4dn.xlarge")
    shutil.rmtree(job.opt_ml.data_dir)  # reading the channels would fail with a DataError
    _fails_with(
        job,
        "ResourceError: ml.g4dn.xlarge has T4 GPUs, but CUDA cannot use them",
        "no NVIDIA driver found",
        f"this image's torch is built for CUDA {torch.version.cuda}",
        "needs NVIDIA driver",
        "set the hyperparameter device=cpu",
    )


def test_device_cuda_fails_without_a_usable_gpu_whatever_the_instance(job: Job) -> None:
    job.set_hyperparameters(FAST, device="cuda")
    _fails_with(job, "ResourceError: no usable GPU: no NVIDIA driver found", "device=cpu")


def test_device_cpu_trains_on_a_gpu_instance_type(job: Job) -> None:
    _on(job, "ml.g4dn.xlarge")
    job.set_hyperparameters(FAST, epochs=1, device="cpu")
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert job.failure() is None
    assert "Device cpu" in run.stderr
    assert " ERROR " not in run.stderr
