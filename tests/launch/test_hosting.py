"""`launch deploy` against moto: what SageMaker and Application Auto Scaling would receive."""

from __future__ import annotations

import re
import subprocess
from typing import Any

from tests.launch.conftest import IMAGE_URI, ROLE, Launch, one_line_error

MODEL_DATA = "s3://artifacts/dog-classifier/train-1/output/model.tar.gz"


def artifact(launch: Launch) -> str:
    """A model.tar.gz in moto's S3 at MODEL_DATA (deploy looks for it before creating anything)."""
    bucket, _, key = MODEL_DATA.removeprefix("s3://").partition("/")
    s3 = launch.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=b"not really a tarball")
    return MODEL_DATA


def deploy(launch: Launch, *flags: str) -> subprocess.CompletedProcess[str]:
    """`launch deploy --model-data MODEL_DATA FLAGS...` with the artifact there; it succeeds."""
    return launch.ok("deploy", "--model-data", artifact(launch), *flags)


def _endpoint(stdout: str) -> str:
    found = re.search(r"^endpoint: (\S+)", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


def _tags(sagemaker: Any, arn: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in sagemaker.list_tags(ResourceArn=arn)["Tags"]}


def test_deploy_gpu_endpoint_with_autoscaling(launch: Launch) -> None:
    done = deploy(
        launch, "--instance-count", "2", "--health-check-timeout", "900",
        "--inference-ami-version", "al2-ami-sagemaker-inference-gpu-2",
        "--env", "SAGEMAKER_MODEL_SERVER_WORKERS=1", "--env", "SERVE_MAX_BATCH_SIZE=16",
        "--autoscale", "2:6", "--target-invocations", "250", "--prefix", "dogs",
    )  # fmt: skip
    endpoint = _endpoint(done.stdout)
    assert endpoint.startswith("dogs-endpoint-")
    assert f"#/endpoints/{endpoint}" in done.stdout
    assert f"launch explain IMAGES --endpoint {endpoint}" in done.stdout
    sagemaker = launch.client("sagemaker")

    described = sagemaker.describe_endpoint(EndpointName=endpoint)
    assert described["EndpointStatus"] == "InService"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
    (variant,) = config["ProductionVariants"]
    assert variant["VariantName"] == "AllTraffic"
    assert variant["InstanceType"] == "ml.g4dn.xlarge"
    assert variant["InitialInstanceCount"] == 2
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 900
    assert variant["InferenceAmiVersion"] == "al2-ami-sagemaker-inference-gpu-2"
    assert "ServerlessConfig" not in variant

    model = sagemaker.describe_model(ModelName=variant["ModelName"])
    assert model["ModelName"].startswith("dogs-model-")
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE_URI
    assert container["ModelDataUrl"] == MODEL_DATA
    assert container["Environment"] == {
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
        "SERVE_MAX_BATCH_SIZE": "16",
        "SERVE_DEVICE": "cuda",
    }
    for arn in (described["EndpointArn"], config["EndpointConfigArn"], model["ModelArn"]):
        assert _tags(sagemaker, arn) == {"created-by": "launch", "launch-prefix": "dogs"}

    scaling = launch.client("application-autoscaling")
    resource = f"endpoint/{endpoint}/variant/AllTraffic"
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["ResourceId"] == resource
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 6)
    (policy,) = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["ResourceId"] == resource
    assert policy["PolicyType"] == "TargetTrackingScaling"
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 250
    assert tracking["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
    }


def test_a_gpu_type_gets_the_ami_the_image_needs_and_serves_on_cuda(launch: Launch) -> None:
    done = deploy(launch, "--endpoint-name", "dogs", "--no-wait")

    # moto's ECR has no such image and this machine's docker engine neither: the default.
    assert (
        "cannot read the image's sagemaker-dog-classifier.cuda label (not in the local docker "
        "engine; ECR: RepositoryNotFoundException: "
    ) in done.stderr
    assert "assuming CUDA 12.6, the Dockerfile's default; pass --image-cuda" in done.stderr
    assert (
        "ml.g4dn.xlarge (T4) would get driver 470 (CUDA 11.4) by default; this image needs "
        "CUDA 12.6 -> driver 525+: InferenceAmiVersion=al2-ami-sagemaker-inference-gpu-2 "
        "(driver 535)\n"
    ) in done.stdout
    (request,) = launch.sent("SageMaker.CreateEndpointConfig")
    (variant,) = request["ProductionVariants"]
    assert variant["InstanceType"] == "ml.g4dn.xlarge"
    assert variant["InferenceAmiVersion"] == "al2-ami-sagemaker-inference-gpu-2"
    (model,) = launch.sent("SageMaker.CreateModel")
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_DEVICE": "cuda"}
    sagemaker = launch.client("sagemaker")
    config = sagemaker.describe_endpoint_config(EndpointConfigName="dogs")
    assert config["ProductionVariants"][0]["InferenceAmiVersion"] == variant["InferenceAmiVersion"]


def test_a_user_serve_device_and_image_cuda_are_kept(launch: Launch) -> None:
    done = deploy(
        launch, "--instance-type", "ml.p3.2xlarge", "--image-cuda", "13.0",
        "--env", "SERVE_DEVICE=auto", "--no-wait",
    )  # fmt: skip
    assert "label" not in done.stderr  # --image-cuda: nothing to read
    assert launch.sent("AmazonEC2ContainerRegistry_V20150921.BatchGetImage") == []
    assert (
        "ml.p3.2xlarge (V100) would get driver 470 (CUDA 11.4) by default; this image needs "
        "CUDA 13.0 -> driver 580+: InferenceAmiVersion=al2023-ami-sagemaker-inference-gpu-4-1 "
        "(driver 580)"
    ) in done.stdout
    (request,) = launch.sent("SageMaker.CreateEndpointConfig")
    assert request["ProductionVariants"][0]["InferenceAmiVersion"] == (
        "al2023-ami-sagemaker-inference-gpu-4-1"
    )
    (model,) = launch.sent("SageMaker.CreateModel")
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_DEVICE": "auto"}


def test_a_cpu_type_gets_no_ami_and_no_device(launch: Launch) -> None:
    done = deploy(launch, "--instance-type", "ml.c5.xlarge", "--no-wait")
    assert "AmiVersion" not in done.stdout
    assert "label" not in done.stderr
    assert launch.sent("AmazonEC2ContainerRegistry_V20150921.BatchGetImage") == []
    (request,) = launch.sent("SageMaker.CreateEndpointConfig")
    (variant,) = request["ProductionVariants"]
    assert variant["InstanceType"] == "ml.c5.xlarge"
    assert "InferenceAmiVersion" not in variant
    (model,) = launch.sent("SageMaker.CreateModel")
    assert "SERVE_DEVICE" not in model["PrimaryContainer"].get("Environment", {})


def test_an_ami_that_cannot_run_the_image_is_refused(launch: Launch) -> None:
    artifact(launch)
    cases = {
        ("--image-cuda", "13.0", "--inference-ami-version", "al2-ami-sagemaker-inference-gpu-2"): (
            "launch: --inference-ami-version: al2-ami-sagemaker-inference-gpu-2 has driver 535 "
            "(CUDA 12.2), which cannot run this image's CUDA 13.0 on ml.g4dn.xlarge: use "
            "al2023-ami-sagemaker-inference-gpu-4-1 (driver 580)"
        ),
        ("--instance-type", "ml.c5.xlarge", "--inference-ami-version", "al2-ami-x"): (
            "launch: ml.c5.xlarge has no NVIDIA GPU: drop --inference-ami-version al2-ami-x "
            "(GPU AMIs are for GPU instance types)"
        ),
    }
    for flags, message in cases.items():
        assert one_line_error(launch("deploy", "--model-data", MODEL_DATA, *flags)) == message
    sagemaker = launch.client("sagemaker")
    assert sagemaker.list_models()["Models"] == []
    assert sagemaker.list_endpoint_configs()["EndpointConfigs"] == []


def test_deploy_serverless_without_waiting(launch: Launch) -> None:
    done = deploy(
        launch, "--serverless", "--memory-size", "4096", "--max-concurrency", "3",
        "--endpoint-name", "dogs-cpu", "--no-wait",
    )  # fmt: skip
    assert _endpoint(done.stdout) == "dogs-cpu"
    sagemaker = launch.client("sagemaker")
    config = sagemaker.describe_endpoint_config(EndpointConfigName="dogs-cpu")
    (variant,) = config["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 3}
    assert "InstanceType" not in variant
    assert "InferenceAmiVersion" not in variant
    assert sagemaker.describe_endpoint(EndpointName="dogs-cpu")["EndpointConfigName"] == "dogs-cpu"
    scaling = launch.client("application-autoscaling")
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_deploy_mistakes_are_one_line_and_create_nothing(launch: Launch) -> None:
    cases = {
        ("--memory-size", "5000", "--serverless"): "--memory-size 5000",
        ("--serverless", "--autoscale", "1:2"): "serverless endpoint scales itself",
        ("--env", "NOEQUALS"): "--env 'NOEQUALS'",
    }
    for flags, message in cases.items():
        assert message in one_line_error(launch("deploy", "--model-data", MODEL_DATA, *flags))
    missing = one_line_error(launch("deploy", "--model-data", MODEL_DATA))
    assert missing.startswith(f"launch: no model artifact at {MODEL_DATA}: ")
    sagemaker = launch.client("sagemaker")
    assert sagemaker.list_models()["Models"] == []
    assert sagemaker.list_endpoints()["Endpoints"] == []


def test_deploy_without_role_is_one_line(launch: Launch) -> None:
    launch.common = ["--image-uri", IMAGE_URI]
    done = launch("deploy", "--model-data", MODEL_DATA)
    assert one_line_error(done) == "launch: no role given: pass --role, or set role in launch.toml"
    assert launch.client("sagemaker").list_models()["Models"] == []
