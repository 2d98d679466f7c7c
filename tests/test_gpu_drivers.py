"""The GPU driver table: which AMI runs which CUDA build on which SageMaker GPU host."""

from __future__ import annotations

import re

import pytest

from container.gpu_drivers import (
    CPU,
    DEFAULT_IMAGE_CUDA,
    INFERENCE_AMIS,
    TRANSFORM_AMIS,
    Ami,
    DriverError,
    ami_line,
    check_cuda,
    choose_ami,
    driver_advice,
    gpu_family,
    min_driver,
    refuse_ami,
)
from tests.conftest import ROOT


def test_the_default_cuda_is_the_dockerfiles() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert set(re.findall(r"^ARG TORCH_CUDA=(\S+)$", dockerfile, re.MULTILINE)) == {
        DEFAULT_IMAGE_CUDA
    }
    (index,) = re.findall(r"^ARG TORCH_INDEX_URL=(\S+)$", dockerfile, re.MULTILINE)
    assert index.endswith("/cu" + DEFAULT_IMAGE_CUDA.replace(".", ""))


@pytest.mark.parametrize(
    ("instance_type", "gpu"),
    [
        ("ml.g4dn.xlarge", "T4"),
        ("ml.g5.12xlarge", "A10G"),
        ("ml.p4d.24xlarge", "A100"),
        ("ml.c5.xlarge", None),
        ("ml.m5.xlarge", None),
        ("ml.inf2.xlarge", None),
        ("local_gpu", None),
        ("ml.g4dn", None),
    ],
)
def test_gpu_family(instance_type: str, gpu: str | None) -> None:
    family = gpu_family(instance_type)
    assert (family.gpu if family else None) == gpu


def test_min_driver_follows_cuda_minor_version_compatibility() -> None:
    assert [min_driver(c) for c in ("11.8", "12.2", "12.6", "13.0")] == [450, 525, 525, 580]
    with pytest.raises(DriverError, match=r"CUDA 14.0: no known driver requirement"):
        min_driver("14.0")


@pytest.mark.parametrize("amis", [INFERENCE_AMIS, TRANSFORM_AMIS])
def test_the_amis_are_listed_oldest_driver_first(amis: tuple[Ami, ...]) -> None:
    drivers = [ami.driver for ami in amis]
    assert drivers == sorted(drivers)


@pytest.mark.parametrize(
    ("instance_type", "cuda", "endpoint", "batch"),
    [
        (
            "ml.g4dn.xlarge",
            "12.6",
            "al2-ami-sagemaker-inference-gpu-2",
            "al2-ami-sagemaker-batch-gpu-535",
        ),
        ("ml.g5.2xlarge", "13.0", "al2023-ami-sagemaker-inference-gpu-4-1", None),
        ("ml.p5e.48xlarge", "12.6", "al2-ami-sagemaker-inference-gpu-3-1", None),  # H200: 550+
        (
            "ml.p3.2xlarge",
            "11.8",
            "al2-ami-sagemaker-inference-gpu-2",
            "al2-ami-sagemaker-batch-gpu-470",
        ),
        ("ml.p2.xlarge", "12.6", None, None),  # the K80's last driver is 470
    ],
)
def test_choose_ami_takes_the_oldest_driver_that_runs_the_image(
    instance_type: str, cuda: str, endpoint: str | None, batch: str | None
) -> None:
    for amis, expected in ((INFERENCE_AMIS, endpoint), (TRANSFORM_AMIS, batch)):
        if expected is None:
            with pytest.raises(DriverError, match=rf"^no AMI runs this image's CUDA {cuda} "):
                choose_ami(amis, instance_type, cuda)
        else:
            assert choose_ami(amis, instance_type, cuda).name == expected


def test_a_cpu_type_takes_no_ami() -> None:
    with pytest.raises(DriverError, match=r"^ml.c5.xlarge has no NVIDIA GPU"):
        choose_ami(INFERENCE_AMIS, "ml.c5.xlarge", "12.6")
    with pytest.raises(DriverError, match=r"^ml.c5.xlarge has no NVIDIA GPU: drop the AMI"):
        refuse_ami(INFERENCE_AMIS, "al2-ami-sagemaker-inference-gpu-2", "ml.c5.xlarge", "12.6")


def test_refuse_ami_keeps_a_fitting_ami_and_names_the_one_to_use_instead() -> None:
    kept = refuse_ami(TRANSFORM_AMIS, "al2-ami-sagemaker-batch-gpu-535", "ml.g4dn.xlarge", "12.6")
    assert kept.driver == 535
    with pytest.raises(DriverError) as too_old:
        refuse_ami(TRANSFORM_AMIS, "al2-ami-sagemaker-batch-gpu-470", "ml.g4dn.xlarge", "12.6")
    assert str(too_old.value) == (
        "al2-ami-sagemaker-batch-gpu-470 has driver 470 (CUDA 11.4), which cannot run this "
        "image's CUDA 12.6 on ml.g4dn.xlarge: use al2-ami-sagemaker-batch-gpu-535 (driver 535)"
    )
    with pytest.raises(DriverError, match=r"^unknown AMI 'al2-gpu-9': use one of al2-ami-"):
        refuse_ami(INFERENCE_AMIS, "al2-gpu-9", "ml.g4dn.xlarge", "12.6")


def test_ami_line_says_what_the_host_would_get_and_what_the_image_needs() -> None:
    ami = choose_ami(INFERENCE_AMIS, "ml.g4dn.xlarge", "12.6")
    assert ami_line("InferenceAmiVersion", ami, "ml.g4dn.xlarge", "12.6") == (
        "ml.g4dn.xlarge (T4) would get driver 470 (CUDA 11.4) by default; this image needs CUDA "
        "12.6 -> driver 525+: InferenceAmiVersion=al2-ami-sagemaker-inference-gpu-2 (driver 535)"
    )
    ami = choose_ami(INFERENCE_AMIS, "ml.g6e.xlarge", "13.0")
    assert ami_line("InferenceAmiVersion", ami, "ml.g6e.xlarge", "13.0").startswith(
        "ml.g6e.xlarge (L40S) has no documented default driver; this image needs CUDA 13.0"
    )


@pytest.mark.parametrize("value", ["12.6", "13.0", "11.8", CPU])
def test_check_cuda_takes_versions_and_cpu(value: str) -> None:
    assert check_cuda(value) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("12", "CUDA '12': give a version such as 12.6, or cpu"),
        ("cuda12.6", "CUDA 'cuda12.6': give a version such as 12.6, or cpu"),
        ("14.0", "CUDA 14.0: no known driver requirement"),
    ],
)
def test_check_cuda_refuses_what_launch_cannot_use(value: str, message: str) -> None:
    with pytest.raises(DriverError, match=re.escape(message)):
        check_cuda(value)


def test_driver_advice_names_both_settings() -> None:
    assert driver_advice("12.6") == (
        "CUDA 12.6 needs NVIDIA driver 525 or later; endpoints: InferenceAmiVersion="
        "al2-ami-sagemaker-inference-gpu-2 (launch deploy sets it); batch transform: "
        "TransformAmiVersion=al2-ami-sagemaker-batch-gpu-535"
    )
    assert driver_advice("13.0").endswith(
        "batch transform: no AMI has that driver, use a CPU instance"
    )
