"""Multi-model endpoints: one endpoint, many model.tar.gz under one S3 prefix, each request naming
the one it is for.

`deploy --multi-model PREFIX` creates the SageMaker model with the SDK v2 `MultiDataModel`
(CreateModel's container has `Mode: MultiModel` and `ModelDataUrl: PREFIX`) and the environment
variable that switches the server into multi-model mode. SageMaker then loads a model from
PREFIX + TargetModel on its first request (`launch invoke --target-model NAME.tar.gz`, the header
container.invocations.TARGET_MODEL on the container's side) and unloads models under memory
pressure. `launch add-model` puts a model.tar.gz under the prefix. AWS runs multi-model endpoints
of a custom container on CPU instances only (GPU ones only with its Triton container).
"""

from __future__ import annotations

import re

from botocore.exceptions import ClientError

from launch.aws import Aws
from launch.errors import LaunchError

__all__ = [
    "MODE",
    "MULTI_MODEL_ENV",
    "check_cpu",
    "check_name",
    "endpoint_prefix",
    "normalise_prefix",
]

MODE = "MultiModel"
"""ContainerDefinition.Mode of a multi-model endpoint's model (as the SDK's MultiDataModel sets)."""
MULTI_MODEL_ENV = "SAGEMAKER_MULTI_MODEL"
"""The container's environment variable that says "multi-model endpoint" (value "true")."""
_SUFFIX = ".tar.gz"

_ACCELERATED = re.compile(r"ml\.(?:g|p|inf|trn)\d")
"""Instance families with a GPU or an AWS accelerator: no multi-model endpoint of our image."""


def check_cpu(instance_type: str) -> None:
    """A LaunchError for an instance type a custom container's multi-model endpoint cannot use."""
    if _ACCELERATED.match(instance_type):
        raise LaunchError(
            f"--instance-type {instance_type}: a multi-model endpoint of a custom image runs on "
            "CPU instances only (AWS serves GPU multi-model endpoints only with its Triton "
            "container): pass a CPU type such as --instance-type ml.c5.xlarge"
        )


def normalise_prefix(uri: str, flag: str) -> str:
    """An S3 prefix as SageMaker joins it with a TargetModel: s3://BUCKET/PREFIX/ (slash added)."""
    if not uri.startswith("s3://") or not uri.removeprefix("s3://").strip("/"):
        raise LaunchError(f"{flag} {uri!r}: give an S3 prefix, e.g. s3://my-bucket/dog-models/")
    return uri if uri.endswith("/") else uri + "/"


def check_name(name: str, flag: str) -> str:
    """A target model's name: a file name under the prefix, ending in .tar.gz."""
    if not name.endswith(_SUFFIX) or len(name) == len(_SUFFIX) or "/" in name:
        raise LaunchError(
            f"{flag} {name!r}: a multi-model endpoint's model is a NAME.tar.gz directly under its "
            f"prefix, e.g. {flag} dog-breeds-v2.tar.gz"
        )
    return name


def endpoint_prefix(aws: Aws, endpoint: str) -> str:
    """The model prefix of a multi-model endpoint: its config's model's ModelDataUrl
    (DescribeEndpoint -> DescribeEndpointConfig -> DescribeModel)."""
    client = aws.boto.client("sagemaker")
    try:
        config = client.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ValidationException":
            raise
        raise LaunchError(
            f"no endpoint {endpoint} in {aws.region}: check the name (launch deploy printed it)"
        ) from exc
    variants = client.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
    model_name = variants[0]["ModelName"]
    model = client.describe_model(ModelName=model_name)
    container = model.get("PrimaryContainer") or model["Containers"][0]
    if container.get("Mode") != MODE:
        raise LaunchError(
            f"endpoint {endpoint} serves one model ({model_name} is not multi-model): deploy one "
            "with launch deploy --multi-model s3://BUCKET/PREFIX/ to add models to it"
        )
    return normalise_prefix(str(container["ModelDataUrl"]), "the model's ModelDataUrl")
