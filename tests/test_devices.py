"""The one device choice of `train` and `serve`: `choose_device` for hosts this machine is not,
and `resolve_device` on this one (no NVIDIA driver, torch built for CUDA)."""

from __future__ import annotations

import logging

import pytest
import torch

from container.devices import (
    CudaProbe,
    CudaUnusableError,
    DeviceChoice,
    DeviceDecision,
    choose_device,
    probe_cuda,
    resolve_device,
)

# What a g4dn/g5 endpoint with no InferenceAmiVersion gives a CUDA 12.6 image: NVML sees the T4
# and driver 470, torch.cuda.is_available() is False.
OLD_DRIVER = CudaProbe(
    cuda="12.6",
    driver="470.256.02",
    devices=1,
    usable=False,
    detail="torch: The NVIDIA driver on your system is too old (found version 11040)",
)
WORKING = CudaProbe(cuda="12.6", driver="550.144.03", devices=4, usable=True)
NO_GPU = CudaProbe(cuda="12.6", driver=None, devices=0, usable=False, detail="NVML: not found")


def test_auto_with_a_gpu_cuda_cannot_use_serves_on_the_cpu_with_one_error_naming_the_ami() -> None:
    decision = choose_device("auto", OLD_DRIVER)
    assert decision.kind == "cpu"
    assert decision.error is not None
    for words in (
        "NVIDIA GPU present but unusable, using the CPU",
        "NVIDIA driver 470.256.02 cannot run this image's CUDA 12.6",
        "found version 11040",
        "CUDA 12.6 needs NVIDIA driver 525 or later",
        "InferenceAmiVersion=al2-ami-sagemaker-inference-gpu-2 ",
        "TransformAmiVersion=al2-ami-sagemaker-batch-gpu-535",
    ):
        assert words in decision.error
    assert "\n" not in decision.error


def test_the_ami_follows_the_images_cuda() -> None:
    probe = CudaProbe(cuda="13.0", driver="535.230.02", devices=1, usable=False)
    error = choose_device("auto", probe).error
    assert error is not None
    assert "driver 535.230.02 cannot run this image's CUDA 13.0" in error
    assert "InferenceAmiVersion=al2023-ami-sagemaker-inference-gpu-4-1" in error
    assert "batch transform: no AMI has that driver, use a CPU instance" in error


def test_a_new_enough_driver_that_still_fails_is_reported_as_torchs_problem() -> None:
    probe = CudaProbe(cuda="12.6", driver="550.1", devices=1, usable=False, detail="torch: boom")
    error = choose_device("auto", probe).error
    assert error is not None
    assert "torch cannot use the GPU with NVIDIA driver 550.1 and this image's CUDA 12.6" in error


@pytest.mark.parametrize(
    ("requested", "probe", "instance_type", "expected"),
    [
        ("auto", WORKING, None, DeviceDecision("cuda")),
        ("auto", WORKING, "ml.g5.xlarge", DeviceDecision("cuda")),
        ("cuda", WORKING, None, DeviceDecision("cuda")),
        ("cpu", WORKING, "ml.p4d.24xlarge", DeviceDecision("cpu")),
        ("cpu", OLD_DRIVER, "ml.g4dn.xlarge", DeviceDecision("cpu")),
        ("auto", NO_GPU, None, DeviceDecision("cpu")),  # a CPU host: no error line
        ("auto", NO_GPU, "ml.c5.xlarge", DeviceDecision("cpu")),
        ("auto", NO_GPU, "local", DeviceDecision("cpu")),  # the SDK's local mode: as today
        ("auto", NO_GPU, "local_gpu", DeviceDecision("cpu")),
    ],
)
def test_choices_that_need_no_error(
    requested: DeviceChoice, probe: CudaProbe, instance_type: str | None, expected: DeviceDecision
) -> None:
    assert choose_device(requested, probe, instance_type) == expected


@pytest.mark.parametrize(
    ("requested", "probe", "instance_type", "words"),
    [
        ("cuda", OLD_DRIVER, None, "no usable GPU: NVIDIA driver 470.256.02 cannot run"),
        ("cuda", NO_GPU, None, "no usable GPU: no NVIDIA driver found (NVML: not found)"),
        ("auto", OLD_DRIVER, "ml.g4dn.xlarge", "ml.g4dn.xlarge has T4 GPUs, but CUDA cannot"),
        ("auto", NO_GPU, "ml.p5.48xlarge", "ml.p5.48xlarge has H100 GPUs, but CUDA cannot"),
        ("cuda", NO_GPU, "ml.c5.xlarge", "no usable GPU: no NVIDIA driver found"),
    ],
)
def test_cuda_required_but_unusable_is_an_error_that_says_why(
    requested: DeviceChoice, probe: CudaProbe, instance_type: str | None, words: str
) -> None:
    with pytest.raises(CudaUnusableError) as raised:
        choose_device(requested, probe, instance_type)
    assert words in str(raised.value)
    assert raised.value.probe.needs() == "CUDA 12.6 needs NVIDIA driver 525 or later"
    assert "InferenceAmiVersion=al2-ami-sagemaker-inference-gpu-2 " in (
        raised.value.probe.hosting_advice()
    )


def test_a_cpu_only_torch_build_says_so() -> None:
    probe = CudaProbe(cuda=None, driver="550.1", devices=1, usable=False)
    with pytest.raises(CudaUnusableError, match="no usable GPU: this image's torch is a CPU-only"):
        choose_device("cuda", probe)
    assert (
        probe.hosting_advice()
        == probe.needs()
        == ("build the image with a CUDA torch (the Dockerfile's TORCH_INDEX_URL)")
    )


def test_this_host_has_no_gpu_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    probe = probe_cuda()
    assert (probe.present, probe.usable, probe.cuda) == (False, False, torch.version.cuda)
    with caplog.at_level(logging.INFO):
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device("cpu") == torch.device("cpu")
        assert resolve_device("auto", instance_type="ml.c5.xlarge") == torch.device("cpu")
    assert not caplog.records  # no NVIDIA device: nothing to complain about
    with pytest.raises(
        CudaUnusableError,
        match=f"no usable GPU: no NVIDIA driver found .*CUDA {torch.version.cuda}",
    ):
        resolve_device("cuda")
