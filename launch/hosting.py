"""`launch deploy`: the image behind an endpoint, maybe autoscaled. Four kinds of endpoint:
real-time (one model.tar.gz, the default), serverless, asynchronous (`--async`, requests through
S3: launch.asynchronous) and multi-model (`--multi-model PREFIX`, every model.tar.gz under an S3
prefix: launch.multi_model).

The SDK v2 `Model(image_uri=...).deploy(...)` (`MultiDataModel` for a multi-model endpoint)
creates the model, the endpoint config and the endpoint, all with explicit names and the tags
`cleanup` looks for. Autoscaling is launch.scaling's, once the endpoint is InService.

On a GPU instance type the endpoint config names the InferenceAmiVersion whose driver runs the
image's CUDA, and the model serves with SERVE_DEVICE=cuda (launch.image says why).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

from botocore.exceptions import ClientError, WaiterError
from sagemaker.async_inference.async_inference_config import AsyncInferenceConfig
from sagemaker.model import Model
from sagemaker.multidatamodel import MultiDataModel
from sagemaker.serverless.serverless_inference_config import ServerlessInferenceConfig

from container.gpu_drivers import CPU
from launch import scaling
from launch.asynchronous import AsyncOptions, add_deploy_arguments
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
from launch.multi_model import MULTI_MODEL_ENV, check_cpu, normalise_prefix
from launch.settings import Common, add_wait_argument

__all__ = ["CREATED_BY", "HELP", "PREFIX_TAG", "Kind", "add_arguments", "run", "tags"]

HELP = (
    "deploy the image to a real-time, serverless, asynchronous or multi-model endpoint, "
    "optionally autoscaled"
)

CREATED_BY = ("created-by", "launch")
"""The tag on everything `deploy` creates; `cleanup` deletes only what carries it."""
PREFIX_TAG = "launch-prefix"

Kind = Literal["real-time", "serverless", "async", "multi-model"]
"""The kinds of endpoint; each but real-time has its flag, --KIND."""

logger = logging.getLogger(__name__)


_GPU_INSTANCE = "ml.g4dn.xlarge"
_CPU_INSTANCE = "ml.c5.xlarge"  # multi-model endpoints of a custom image run on CPUs only


def instance_type(settings: Mapping[str, Any]) -> str:
    """The instance type `deploy` uses with these settings (its flags, or its config table)."""
    given: str | None = settings.get("instance_type")
    return given or (_CPU_INSTANCE if settings.get("multi_model") else _GPU_INSTANCE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-data",
        help="s3://.../model.tar.gz, as the training job wrote it (all but --multi-model)",
    )
    parser.add_argument("--endpoint-name", help="(default: PREFIX-endpoint-TIMESTAMP)")
    parser.add_argument(
        "--instance-type",
        help=f"hosting instance (default: {_GPU_INSTANCE}, a T4 GPU; with --multi-model "
        f"{_CPU_INSTANCE}, as for the CPU image)",
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
        "--multi-model",
        metavar="S3_PREFIX",
        help="a multi-model endpoint serving every NAME.tar.gz under this prefix (CPU instances; "
        "launch add-model puts models there, launch invoke --target-model NAME.tar.gz asks one)",
    )
    add_deploy_arguments(parser)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="container environment, repeatable (e.g. SAGEMAKER_MODEL_SERVER_WORKERS=1)",
    )
    parser.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        help="autoscale the instance count between MIN and MAX (MIN 0 only with --async)",
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


def _kind(args: argparse.Namespace) -> Kind:
    flags: dict[Kind, bool] = {
        "serverless": args.serverless,
        "async": args.asynchronous,
        "multi-model": args.multi_model is not None,
    }
    chosen = [kind for kind, given in flags.items() if given]
    if len(chosen) > 1:
        raise LaunchError(f"--{' and --'.join(chosen)}: pick one kind of endpoint")
    return chosen[0] if chosen else "real-time"


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


def _autoscaling(
    args: argparse.Namespace, kind: Kind
) -> tuple[scaling.Limits, scaling.Target] | None:
    if args.autoscale is None:
        return None
    if kind == "serverless":
        raise LaunchError("--autoscale applies to instances: a serverless endpoint scales itself")
    if kind == "async":
        if not args.target_backlog > 0:
            raise LaunchError(f"--target-backlog {args.target_backlog}: use a number above 0")
        return scaling.parse_limits(args.autoscale, lowest=0), scaling.Backlog(args.target_backlog)
    return scaling.parse_limits(args.autoscale, lowest=1), scaling.Invocations(
        args.target_invocations
    )


def _check(args: argparse.Namespace, kind: Kind) -> None:
    if kind == "serverless":
        if not (1024 <= args.memory_size <= 6144 and args.memory_size % 1024 == 0):
            raise LaunchError(f"--memory-size {args.memory_size}: use 1024, 2048, ... up to 6144")
        if not 1 <= args.max_concurrency <= 200:
            raise LaunchError(f"--max-concurrency {args.max_concurrency}: use 1 to 200")
        if args.inference_ami_version:
            raise LaunchError("--inference-ami-version applies to instances, not --serverless")
    if args.health_check_timeout is not None:
        if kind == "multi-model":
            raise LaunchError(
                "--health-check-timeout: the SDK's MultiDataModel sets none for a multi-model "
                "endpoint; drop it"
            )
        if not 60 <= args.health_check_timeout <= 3600:
            raise LaunchError(f"--health-check-timeout {args.health_check_timeout}: use 60 to 3600")
    if args.instance_count < 1:
        raise LaunchError(f"--instance-count {args.instance_count}: use 1 or more")
    if kind == "multi-model":
        if args.model_data is not None:
            raise LaunchError(
                "--model-data with --multi-model: the endpoint serves the models under its "
                "prefix; put them there with launch add-model MODEL.tar.gz --endpoint NAME"
            )
        check_cpu(args.instance_type)
    elif args.model_data is None or not args.model_data.startswith("s3://"):
        given = "none" if args.model_data is None else repr(args.model_data)
        raise LaunchError(f"--model-data {given}: give the s3:// URI of model.tar.gz")


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


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


_MISSING = ("404", "NoSuchKey", "NoSuchBucket")


def _check_artifact(aws: Aws, uri: str) -> None:
    """A missing model.tar.gz fails an endpoint only after minutes of provisioning: look first.
    Only a definite 404 stops the command; the caller may lack s3:GetObject where the role has it.
    """
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        aws.boto.client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _code(exc) in _MISSING:
            raise LaunchError(
                f"no model artifact at {uri}: give the s3:// URI of a model.tar.gz that a "
                "training job wrote"
            ) from exc
        logger.warning("cannot check %s (%s): deploying anyway", uri, _code(exc))


def _check_prefix(aws: Aws, prefix: str) -> None:
    """A multi-model endpoint may start empty, but not in a bucket that is not there; an empty
    prefix gets a hint."""
    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    try:
        listed = aws.boto.client("s3").list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except ClientError as exc:
        if _code(exc) in _MISSING:
            raise LaunchError(
                f"--multi-model {prefix}: no bucket {bucket} (in this account and region)"
            ) from exc
        logger.warning("cannot check %s (%s): deploying anyway", prefix, _code(exc))
        return
    if not listed.get("KeyCount"):
        logger.warning(
            "no model under %s yet: add one with launch add-model MODEL.tar.gz --endpoint NAME",
            prefix,
        )


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


def _plan(args: argparse.Namespace, kind: Kind, image: str, aws: Aws) -> HostPlan:
    if kind == "serverless":
        _warn_unless_cpu_build(image, aws, args.image_cuda)
        return HostPlan(None, serve_on_gpu=False)
    return plan_host(
        args.instance_type,
        args.inference_ami_version,
        ENDPOINT,
        lambda: image_cuda(image, aws.boto, args.image_cuda),
    )


def _placement(
    args: argparse.Namespace, kind: Kind, plan: HostPlan, queued: AsyncInferenceConfig | None
) -> dict[str, Any]:
    """Where and how the model runs: deploy()'s arguments beyond the names and tags."""
    if kind == "serverless":
        config = ServerlessInferenceConfig(
            memory_size_in_mb=args.memory_size, max_concurrency=args.max_concurrency
        )
        return {"serverless_inference_config": config}
    placement: dict[str, Any] = {
        "initial_instance_count": args.instance_count,
        "instance_type": args.instance_type,
    }
    if kind == "multi-model":  # MultiDataModel.deploy takes no more than these
        return placement
    placement["inference_ami_version"] = plan.ami
    placement["container_startup_health_check_timeout"] = args.health_check_timeout
    if queued is not None:
        placement["async_inference_config"] = queued
    return placement


def _next_steps(kind: Kind, endpoint: str) -> list[str]:
    """How to use the endpoint, as commands."""
    if kind == "async":
        return [
            f"launch invoke --async IMAGES --endpoint {endpoint}",
            f"aws sagemaker-runtime invoke-endpoint-async --endpoint-name {endpoint} "
            "--content-type image/jpeg --input-location s3://BUCKET/dog.jpg",
        ]
    if kind == "multi-model":
        return [
            f"launch add-model model.tar.gz --endpoint {endpoint} --name dogs-v1.tar.gz",
            f"launch invoke IMAGES --endpoint {endpoint} --target-model dogs-v1.tar.gz",
        ]
    return [
        f"launch explain IMAGES --endpoint {endpoint} --out gallery.html",
        f"aws sagemaker-runtime invoke-endpoint --endpoint-name {endpoint} "
        "--content-type image/jpeg --body fileb://dog.jpg out.json",
    ]


def run(args: argparse.Namespace, common: Common) -> int:
    role = common.need("role")
    image = common.need("image_uri")
    kind = _kind(args)
    args.instance_type = instance_type(vars(args))
    _check(args, kind)
    env = _environment(args.env)
    options = AsyncOptions.from_args(args) if kind == "async" else None
    if options is not None:
        env = options.environment(env)
    prefix = normalise_prefix(args.multi_model, "--multi-model") if kind == "multi-model" else None
    if prefix is not None:
        env[MULTI_MODEL_ENV] = "true"
    autoscaling = _autoscaling(args, kind)
    aws = Aws.connect(common)
    if prefix is None:
        _check_artifact(aws, args.model_data)
    else:
        _check_prefix(aws, prefix)
    queued = None if options is None else options.config(aws)
    plan = _plan(args, kind, image, aws)
    if plan.serve_on_gpu:
        # A host whose driver cannot run the image then fails its health check instead of
        # serving on the CPU, slowly, on a GPU bill.
        env.setdefault(SERVE_DEVICE, "cuda")
    endpoint = args.endpoint_name or job_name(common.prefix, "endpoint")
    settings: dict[str, Any] = {
        "image_uri": image,
        "role": role,
        "env": env or None,
        "name": job_name(common.prefix, "model"),
        "sagemaker_session": aws.sagemaker,
    }
    model = (
        Model(model_data=args.model_data, **settings)
        if prefix is None
        else MultiDataModel(model_data_prefix=prefix, **settings)
    )
    model.deploy(
        endpoint_name=endpoint,
        tags=tags(common.prefix),
        wait=False,  # the SDK's wait sleeps 30 s before its first look; _wait looks first
        **_placement(args, kind, plan, queued),
    )
    print(f"model:    {model.name}" + (f" (models under {prefix})" if prefix else ""))
    print(f"endpoint: {endpoint} (its config has the same name)")
    if queued is not None:
        print(f"async:    results to {queued.output_path}, failures to {queued.failure_path}")
    if args.wait or autoscaling is not None:
        _wait(aws, endpoint)
    if autoscaling is not None:
        limits, target = autoscaling
        woken = scaling.register(aws, endpoint, limits, target, tags(common.prefix))
        print(f"autoscaling: {limits.low}..{limits.high} instances, {target.describe()}")
        if woken:
            alarm = scaling.wake_alarm_name(endpoint)
            print(f"             and from zero: one instance when the alarm {alarm} fires")
    print(f"console:  {console_url(aws.region, 'endpoints', endpoint)}")
    first, *rest = _next_steps(kind, endpoint)
    print(f"invoke:   {first}")
    for line in rest:
        print(f"          {line}")
    return 0
