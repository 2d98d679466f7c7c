"""`launch deploy`: a model artifact behind a real-time or serverless endpoint, maybe autoscaled.

The SDK v2 `Model(image_uri=...).deploy(...)` creates the model, the endpoint config and the
endpoint, all with explicit names and the tags `cleanup` looks for. Autoscaling is Application Auto
Scaling (the SDK has no wrapper for it): a scalable target on the variant's instance count and a
target-tracking policy on invocations per instance.

On a GPU instance type the endpoint config names the InferenceAmiVersion whose driver runs the
image's CUDA, and the model serves with SERVE_DEVICE=cuda (launch.image says why).
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from botocore.exceptions import ClientError, WaiterError
from sagemaker.model import Model
from sagemaker.serverless.serverless_inference_config import ServerlessInferenceConfig

from container.gpu_drivers import CPU
from launch.aws import Aws, console_url, job_name
from launch.errors import LaunchError
from launch.image import (
    ENDPOINT,
    SERVE_DEVICE,
    HostPlan,
    add_host_arguments,
    image_cuda,
    plan_host,
    read_label,
)
from launch.settings import Common, add_wait_argument

__all__ = [
    "CREATED_BY",
    "HELP",
    "PREFIX_TAG",
    "SCALABLE_DIMENSION",
    "VARIANT",
    "add_arguments",
    "run",
    "scalable_resource",
    "tags",
]

HELP = "deploy a model.tar.gz to a real-time (or serverless) endpoint, optionally autoscaled"

CREATED_BY = ("created-by", "launch")
"""The tag on everything `deploy` creates; `cleanup` deletes only what carries it."""
PREFIX_TAG = "launch-prefix"
VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_METRIC = "SageMakerVariantInvocationsPerInstance"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-data", required=True, help="s3://.../model.tar.gz, as the training job wrote it"
    )
    parser.add_argument("--endpoint-name", help="(default: PREFIX-endpoint-TIMESTAMP)")
    parser.add_argument(
        "--instance-type",
        default="ml.g4dn.xlarge",
        help="hosting instance (default: %(default)s, a T4 GPU; ml.c5.xlarge for the CPU image)",
    )
    parser.add_argument("--instance-count", type=int, default=1, help="(default: %(default)s)")
    parser.add_argument(
        "--health-check-timeout",
        type=int,
        metavar="SECONDS",
        help="ContainerStartupHealthCheckTimeoutInSeconds, 60-3600 (SageMaker's default: 8 min)",
    )
    add_host_arguments(parser, ENDPOINT)
    parser.add_argument(
        "--serverless",
        action="store_true",
        help="a serverless endpoint instead of instances (CPU only: deploy the CPU image)",
    )
    parser.add_argument(
        "--memory-size",
        type=int,
        default=3072,
        metavar="MB",
        help="serverless memory, 1024-6144 in steps of 1024 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        default=5,
        help="serverless concurrent invocations, 1-200 (default: %(default)s)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="container environment, repeatable (e.g. SAGEMAKER_MODEL_SERVER_WORKERS=1)",
    )
    parser.add_argument(
        "--autoscale", metavar="MIN:MAX", help="autoscale the instance count between MIN and MAX"
    )
    parser.add_argument(
        "--target-invocations",
        type=int,
        default=100,
        metavar="N",
        help="autoscaling target: invocations per instance per minute (default: %(default)s)",
    )
    add_wait_argument(parser, "until the endpoint is InService (--autoscale always waits)")


def tags(prefix: str) -> list[dict[str, str]]:
    """What `deploy` puts on its resources, so that `cleanup` for the same prefix finds them."""
    return [{"Key": CREATED_BY[0], "Value": CREATED_BY[1]}, {"Key": PREFIX_TAG, "Value": prefix}]


def scalable_resource(endpoint: str) -> str:
    """Application Auto Scaling's ResourceId of an endpoint's one variant."""
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def _environment(pairs: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(
                f"--env {pair!r}: use NAME=VALUE, e.g. SAGEMAKER_MODEL_SERVER_WORKERS=1"
            )
        env[key] = value
    return env


def _autoscale(value: str | None, serverless: bool) -> tuple[int, int] | None:
    if value is None:
        return None
    if serverless:
        raise LaunchError("--autoscale applies to instances: a serverless endpoint scales itself")
    low, sep, high = value.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise LaunchError(f"--autoscale {value!r}: use MIN:MAX with 1 <= MIN <= MAX, e.g. 1:4")
    return int(low), int(high)


def _check(args: argparse.Namespace) -> None:
    if args.serverless:
        if not (1024 <= args.memory_size <= 6144 and args.memory_size % 1024 == 0):
            raise LaunchError(f"--memory-size {args.memory_size}: use 1024, 2048, ... up to 6144")
        if not 1 <= args.max_concurrency <= 200:
            raise LaunchError(f"--max-concurrency {args.max_concurrency}: use 1 to 200")
        if args.inference_ami_version:
            raise LaunchError("--inference-ami-version applies to instances, not --serverless")
    if args.health_check_timeout is not None and not 60 <= args.health_check_timeout <= 3600:
        raise LaunchError(f"--health-check-timeout {args.health_check_timeout}: use 60 to 3600")
    if args.instance_count < 1:
        raise LaunchError(f"--instance-count {args.instance_count}: use 1 or more")
    if not args.model_data.startswith("s3://"):
        raise LaunchError(f"--model-data {args.model_data!r}: give the s3:// URI of model.tar.gz")


def _warn_unless_cpu_build(image: str, aws: Aws, given: str | None) -> None:
    """Serverless has no GPU and caps images at 10 GB: the CUDA build runs there, slowly and big."""
    cuda = given or read_label(image, aws.boto).cuda
    if cuda is None and "cpu" not in image.lower():
        logger.warning(
            "serverless has no GPU: deploy the CPU build of the image (TORCH_INDEX_URL=.../cpu); "
            "%s does not say cpu",
            image,
        )
    elif cuda is not None and cuda != CPU:
        logger.warning(
            "serverless has no GPU: deploy the CPU build of the image (TORCH_INDEX_URL=.../cpu); "
            "%s is built for CUDA %s",
            image,
            cuda,
        )


def _register_autoscaling(
    aws: Aws, endpoint: str, limits: tuple[int, int], target: int, prefix: str
) -> None:
    client = aws.boto.client("application-autoscaling")
    resource = scalable_resource(endpoint)
    client.register_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=resource,
        ScalableDimension=SCALABLE_DIMENSION,
        MinCapacity=limits[0],
        MaxCapacity=limits[1],
        Tags={item["Key"]: item["Value"] for item in tags(prefix)},
    )
    client.put_scaling_policy(
        PolicyName=f"{endpoint}-invocations",
        ServiceNamespace="sagemaker",
        ResourceId=resource,
        ScalableDimension=SCALABLE_DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": float(target),
            "PredefinedMetricSpecification": {"PredefinedMetricType": SCALING_METRIC},
            "ScaleInCooldown": 300,
            "ScaleOutCooldown": 60,
        },
    )


def _check_artifact(aws: Aws, uri: str) -> None:
    """A missing model.tar.gz fails an endpoint only after minutes of provisioning: look first.
    Only a definite 404 stops the command; the caller may lack s3:GetObject where the role has it.
    """
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        aws.boto.client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            raise LaunchError(
                f"no model artifact at {uri}: give the s3:// URI of a model.tar.gz that a "
                "training job wrote"
            ) from exc
        logger.warning("cannot check %s (%s): deploying anyway", uri, code)


def _wait(aws: Aws, endpoint: str) -> None:
    """Until InService; a Failed endpoint becomes a LaunchError carrying SageMaker's reason."""
    client = aws.boto.client("sagemaker")
    logger.info("waiting for %s to be InService (usually 5 to 10 minutes)", endpoint)
    try:
        client.get_waiter("endpoint_in_service").wait(
            EndpointName=endpoint, WaiterConfig={"Delay": 15, "MaxAttempts": 240}
        )
    except WaiterError as exc:
        reason = client.describe_endpoint(EndpointName=endpoint).get("FailureReason", str(exc))
        raise LaunchError(
            f"endpoint {endpoint} did not come up: {reason} (its CloudWatch log group is "
            f"/aws/sagemaker/Endpoints/{endpoint}; run launch cleanup to delete it)"
        ) from exc


def run(args: argparse.Namespace, common: Common) -> int:
    role = common.need("role")
    image = common.need("image_uri")
    _check(args)
    env = _environment(args.env)
    limits = _autoscale(args.autoscale, args.serverless)
    aws = Aws.connect(common)
    _check_artifact(aws, args.model_data)
    if args.serverless:
        _warn_unless_cpu_build(image, aws, args.image_cuda)
        plan = HostPlan(None, serve_on_gpu=False)
    else:
        plan = plan_host(
            args.instance_type,
            args.inference_ami_version,
            ENDPOINT,
            lambda: image_cuda(image, aws.boto, args.image_cuda),
        )
    if plan.serve_on_gpu:
        # A host whose driver cannot run the image then fails its health check instead of
        # serving on the CPU, slowly, on a GPU bill.
        env.setdefault(SERVE_DEVICE, "cuda")
    endpoint = args.endpoint_name or job_name(common.prefix, "endpoint")
    model = Model(
        image_uri=image,
        model_data=args.model_data,
        role=role,
        env=env or None,
        name=job_name(common.prefix, "model"),
        sagemaker_session=aws.sagemaker,
    )
    placement: dict[str, Any] = (
        {
            "serverless_inference_config": ServerlessInferenceConfig(
                memory_size_in_mb=args.memory_size, max_concurrency=args.max_concurrency
            )
        }
        if args.serverless
        else {
            "initial_instance_count": args.instance_count,
            "instance_type": args.instance_type,
            "inference_ami_version": plan.ami,
        }
    )
    # The SDK's own wait sleeps 30 s before its first look; the waiter looks first.
    model.deploy(
        endpoint_name=endpoint,
        tags=tags(common.prefix),
        container_startup_health_check_timeout=args.health_check_timeout,
        wait=False,
        **placement,
    )
    print(f"model:    {model.name}")
    print(f"endpoint: {endpoint} (its config has the same name)")
    if args.wait or limits is not None:
        _wait(aws, endpoint)
    if limits is not None:
        _register_autoscaling(aws, endpoint, limits, args.target_invocations, common.prefix)
        print(
            f"autoscaling: {limits[0]}..{limits[1]} instances, "
            f"target {args.target_invocations} invocations per instance per minute"
        )
    print(f"console:  {console_url(aws.region, 'endpoints', endpoint)}")
    print(f"invoke:   launch explain IMAGES --endpoint {endpoint} --out gallery.html")
    print(
        f"          aws sagemaker-runtime invoke-endpoint --endpoint-name {endpoint} "
        "--content-type image/jpeg --body fileb://dog.jpg out.json"
    )
    return 0
