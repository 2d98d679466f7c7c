"""Asynchronous inference: requests queued through S3, answered into S3, for big inputs and long
work, on an endpoint that may scale to zero while nothing is queued.

`deploy --async` gives the endpoint config an SDK v2 `AsyncInferenceConfig` (where results and
failures go, optional SNS topics, requests per instance) and raises the container's payload cap and
timeout through the model's environment, since an asynchronous request may be up to 1 GB and take
up to an hour. `invoke --async` uploads each input, calls InvokeEndpointAsync with its S3 location
and waits for whichever of the output and failure objects appears. The S3 layout under the
project's bucket and prefix is one function, `layout`.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from sagemaker.async_inference.async_inference_config import AsyncInferenceConfig

from container.invocations import MAX_ASYNC_PAYLOAD_MB
from launch.aws import Aws, unique_stamp
from launch.errors import LaunchError

__all__ = [
    "MAX_TIMEOUT_S",
    "PAYLOAD_ENV",
    "TIMEOUT_ENV",
    "AsyncOptions",
    "Layout",
    "Locations",
    "Result",
    "add_deploy_arguments",
    "layout",
    "submit",
    "upload",
    "wait_for",
]

PAYLOAD_ENV = "SAGEMAKER_MAX_PAYLOAD_IN_MB"
"""The container's cap on a request body, in MB (6 unless raised)."""
TIMEOUT_ENV = "SAGEMAKER_MODEL_SERVER_TIMEOUT"
"""Seconds the container gives a request for its predictions (60 unless raised)."""
MAX_TIMEOUT_S = 3600
"""The longest an asynchronous request may run (InvocationTimeoutSeconds' maximum)."""

# Polling S3 for a result: soon at first (a small image takes a second), then less often, since a
# queued request may wait minutes for an instance. botocore's S3 waiters watch one key at a fixed
# delay, and the SDK's AsyncPredictor watches two with threads that go on polling after one key
# appears, which would keep this process alive: so a short loop of our own.
_FIRST_POLL_S = 0.5
_LONGEST_POLL_S = 15.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where asynchronous requests and their answers go by default."""

    input: str
    output: str
    failure: str


def layout(aws: Aws) -> Layout:
    """s3://BUCKET/PREFIX/async/{input,output,failure}: the project's bucket and prefix."""
    return Layout(
        aws.s3_uri("async", "input"), aws.s3_uri("async", "output"), aws.s3_uri("async", "failure")
    )


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """`deploy`'s flags for an asynchronous endpoint."""
    group = parser.add_argument_group("asynchronous endpoint (--async)")
    group.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="an asynchronous endpoint: requests and results through S3, may scale to zero "
        "(--autoscale 0:MAX)",
    )
    group.add_argument(
        "--async-output",
        metavar="S3_URI",
        help="where results go (default: s3://BUCKET/PREFIX/async/output)",
    )
    group.add_argument(
        "--async-failure",
        metavar="S3_URI",
        help="where failures go (default: s3://BUCKET/PREFIX/async/failure)",
    )
    group.add_argument("--sns-success-topic", metavar="ARN", help="SNS topic told of each result")
    group.add_argument("--sns-error-topic", metavar="ARN", help="SNS topic told of each failure")
    group.add_argument(
        "--max-concurrent-invocations",
        type=int,
        metavar="N",
        help="requests each instance is sent at once (default: SageMaker's choice)",
    )
    group.add_argument(
        "--max-payload-mb",
        type=int,
        default=MAX_ASYNC_PAYLOAD_MB,
        metavar="MB",
        help=f"the container's request size cap, {PAYLOAD_ENV} (default and most: %(default)s)",
    )
    group.add_argument(
        "--model-server-timeout",
        type=int,
        default=MAX_TIMEOUT_S,
        metavar="SECONDS",
        help=f"the container's time per request, {TIMEOUT_ENV} (default and most: %(default)s)",
    )
    group.add_argument(
        "--target-backlog",
        type=float,
        default=5,
        metavar="N",
        help="autoscaling target: queued requests per instance (default: %(default)s)",
    )


def _s3_uri(value: str | None, flag: str) -> str | None:
    if value is not None and not value.startswith("s3://"):
        raise LaunchError(f"{flag} {value!r}: give an s3:// URI")
    return value


def _topic(value: str | None, flag: str) -> str | None:
    if value is not None and not (value.startswith("arn:") and ":sns:" in value):
        raise LaunchError(
            f"{flag} {value!r}: give an SNS topic ARN, arn:aws:sns:REGION:ACCOUNT:NAME"
        )
    return value


@dataclass(frozen=True)
class AsyncOptions:
    """An asynchronous endpoint's settings from `deploy`'s flags; paths None: `layout`'s."""

    output: str | None
    failure: str | None
    success_topic: str | None
    error_topic: str | None
    max_concurrent: int | None
    max_payload_mb: int
    timeout_s: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AsyncOptions:
        if not 1 <= args.max_payload_mb <= MAX_ASYNC_PAYLOAD_MB:
            raise LaunchError(
                f"--max-payload-mb {args.max_payload_mb}: use 1 to {MAX_ASYNC_PAYLOAD_MB}"
            )
        if not 1 <= args.model_server_timeout <= MAX_TIMEOUT_S:
            raise LaunchError(
                f"--model-server-timeout {args.model_server_timeout}: use 1 to {MAX_TIMEOUT_S}"
            )
        if args.max_concurrent_invocations is not None and args.max_concurrent_invocations < 1:
            raise LaunchError(
                f"--max-concurrent-invocations {args.max_concurrent_invocations}: use 1 or more"
            )
        return cls(
            output=_s3_uri(args.async_output, "--async-output"),
            failure=_s3_uri(args.async_failure, "--async-failure"),
            success_topic=_topic(args.sns_success_topic, "--sns-success-topic"),
            error_topic=_topic(args.sns_error_topic, "--sns-error-topic"),
            max_concurrent=args.max_concurrent_invocations,
            max_payload_mb=args.max_payload_mb,
            timeout_s=args.model_server_timeout,
        )

    def environment(self, env: dict[str, Any]) -> dict[str, Any]:
        """`env` with the container's payload cap and timeout raised; set only by their flags."""
        for name, flag in (
            (PAYLOAD_ENV, "--max-payload-mb"),
            (TIMEOUT_ENV, "--model-server-timeout"),
        ):
            if name in env:
                raise LaunchError(f"--env {name}=...: with --async, set it with {flag}")
        return {**env, PAYLOAD_ENV: str(self.max_payload_mb), TIMEOUT_ENV: str(self.timeout_s)}

    def config(self, aws: Aws) -> AsyncInferenceConfig:
        """The endpoint config's part; `layout`'s paths (and so the bucket) only where needed."""
        topics = {"SuccessTopic": self.success_topic, "ErrorTopic": self.error_topic}
        notification = {k: v for k, v in topics.items() if v is not None}
        return AsyncInferenceConfig(
            output_path=self.output or layout(aws).output,
            failure_path=self.failure or layout(aws).failure,
            max_concurrent_invocations_per_instance=self.max_concurrent,
            notification_config=notification or None,
        )


@dataclass(frozen=True)
class Locations:
    """Where SageMaker will put one request's answer: the output, else the failure."""

    output: str
    failure: str | None


@dataclass(frozen=True)
class Result:
    """One request's answer: the output's bytes, or the failure object's text (ok False)."""

    ok: bool
    body: bytes


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def upload(aws: Aws, path: Path, prefix: str, content_type: str) -> str:
    """`path` under `prefix` in a folder of its own (a time stamp and a random part, so that
    nothing is overwritten); its S3 URI."""
    uri = f"{prefix.rstrip('/')}/{unique_stamp(random_hex=8)}/{path.name}"
    bucket, key = _split(uri)
    # The managed transfer: multipart for the big inputs asynchronous inference is for.
    aws.boto.client("s3").upload_file(
        str(path), bucket, key, ExtraArgs={"ContentType": content_type}
    )
    return uri


def submit(
    runtime: Any,
    endpoint: str,
    input_uri: str,
    content_type: str,
    attributes: str,
    invocation_timeout: int | None,
) -> Locations:
    """InvokeEndpointAsync for the input at `input_uri`: where its answer will be."""
    extra = {} if invocation_timeout is None else {"InvocationTimeoutSeconds": invocation_timeout}
    answer = runtime.invoke_endpoint_async(
        EndpointName=endpoint,
        InputLocation=input_uri,
        ContentType=content_type,
        Accept="application/json",
        CustomAttributes=attributes,
        **extra,
    )
    return Locations(answer["OutputLocation"], answer.get("FailureLocation"))


def _read(s3: Any, uri: str | None) -> bytes | None:
    if uri is None:
        return None
    bucket, key = _split(uri)
    try:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
            return None
        raise


def wait_for(s3: Any, where: Locations, deadline: float) -> Result | None:
    """The answer once its output or failure object is there; None if neither is by `deadline`
    (time.monotonic()), after one last look."""
    delay = _FIRST_POLL_S
    while True:
        output = _read(s3, where.output)
        if output is not None:
            return Result(True, output)
        failure = _read(s3, where.failure)
        if failure is not None:
            return Result(False, failure)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        logger.debug("no answer at %s yet; looking again in %.1f s", where.output, delay)
        time.sleep(min(delay, left))
        delay = min(delay * 2, _LONGEST_POLL_S)
