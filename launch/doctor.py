"""`launch doctor`: the settings checked against the account before anything is paid for.

A new account's first hour fails one command at a time, each after minutes of provisioning: a role
SageMaker may not assume, a bucket in another region, an image pushed as an OCI index, a quota of
zero GPUs, a GPU host whose driver cannot run the image. Doctor asks each question with one
read-only call (it creates nothing, not even SageMaker's default bucket) and answers in one table.
Only a definite problem is FAIL (exit status 1); what this caller may not read, or an API does not
answer (moto answers few of these), is "could not check", with how to check by hand.

Sources:
- SageMaker execution roles (sagemaker/latest/dg/sagemaker-roles.html): the trust policy allows
  sts:AssumeRole to the service principal sagemaker.amazonaws.com.
- CreateModel (APIReference/API_CreateModel.html): the image in ECR and the model artifacts in S3
  must be in the model's region; training reads its channels from S3 in its own region too.
- SageMaker refuses OCI media types, an image index and a single OCI manifest alike: "Unsupported
  manifest media type application/vnd.oci.image.manifest.v1+json" (aws/amazon-sagemaker-feedback
  #180), "... application/vnd.oci.image.index.v1+json" (mlflow/mlflow#13834); BuildKit pushes an
  index when it attaches provenance (docker/buildx#1533).
- Service Quotas names SageMaker's instance quotas "<type> for training job usage" and "<type>
  for endpoint usage", as ResourceLimitExceeded quotes them ("The account-level service limit
  'ml.g4dn.xlarge for endpoint usage' is 0 Instances").
- The GPU driver each host gets: container/gpu_drivers.py. Debugger's closure to new customers
  (7/30/26): the "Debugger availability change" note in the SageMaker developer guide.
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoRegionError
from botocore.parsers import ResponseParserError
from sagemaker.fw_utils import DEBUGGER_UNSUPPORTED_REGIONS

from container.gpu_drivers import (
    CPU,
    DEFAULT_IMAGE_CUDA,
    DriverError,
    ami_line,
    choose_ami,
    gpu_family,
    refuse_ami,
)
from launch import hosting, training
from launch.aws import Aws
from launch.errors import LaunchError, explain
from launch.image import DOCKER_V2, ECR_URI, ENDPOINT, MANIFEST_TYPES, fetch_config, read_label
from launch.settings import Common, load_config

__all__ = ["HELP", "Row", "add_arguments", "diagnose", "render", "run"]

HELP = "check role, bucket, image, quotas, GPU driver and Debugger before the first job"

Result = Literal["ok", "FAIL", "could not check"]
OK: Result = "ok"
FAIL: Result = "FAIL"
UNKNOWN: Result = "could not check"

_PUSH = "rebuild and push with ./push_to_ecr.sh (docker build --provenance=false, linux/amd64)"

_UNANSWERED = (BotoCoreError, ClientError, ResponseParserError)
"""What a call that got no usable answer raises (a body botocore cannot parse is the last)."""

# Few calls, each read-only: one retry, so that an API that does not answer (moto's HTTP 500 for
# what it does not implement) costs one back-off instead of botocore's default four.
_CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=10)


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    check: str
    result: Result
    todo: str
    """What to do (or, for ok, what was found)."""


@dataclass(frozen=True)
class Plan:
    """What the other commands will ask of SageMaker, as their settings give it."""

    training_type: str
    hosting_type: str
    inference_ami: str | None
    debugger: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train = _defaults(training.add_arguments)
    deploy = _defaults(hosting.add_arguments)
    parser.add_argument(
        "--training-instance-type",
        help="what `launch train` will use (default: its own setting, else "
        f"{train['instance_type']})",
    )
    parser.add_argument(
        "--hosting-instance-type",
        help="what `launch deploy` will use (default: its own setting, else "
        f"{hosting.instance_type(deploy)})",
    )


def _defaults(add: Callable[[argparse.ArgumentParser], None]) -> dict[str, Any]:
    """A command's defaults, read from its own parser, so doctor never copies them."""
    parser = argparse.ArgumentParser(add_help=False)
    add(parser)
    return {name: parser.get_default(name) for name in ("instance_type", "debugger")}


def _plan(args: argparse.Namespace) -> Plan:
    """Doctor's flags, else the config file's [train] and [deploy], else those commands'
    defaults: what `launch train` and `launch deploy` would use."""
    config = load_config(args.config)
    train = {**_defaults(training.add_arguments), **config.get("train", {})}
    deploy = {**_defaults(hosting.add_arguments), **config.get("deploy", {})}
    return Plan(
        training_type=args.training_instance_type or train["instance_type"],
        hosting_type=args.hosting_instance_type or hosting.instance_type(deploy),
        inference_ami=deploy.get("inference_ami_version"),
        debugger=train.get("debugger") or "auto",
    )


def _why(exc: BotoCoreError | ClientError | ResponseParserError) -> str:
    """A short reason for a call that got no usable answer (never the HTML page of a 500)."""
    if isinstance(exc, ResponseParserError):
        return "AWS's answer could not be parsed"
    if isinstance(exc, BotoCoreError):
        return str(exc).splitlines()[0][:160]
    error = exc.response.get("Error", {})
    message = str(error.get("Message", "")).strip()
    if message.startswith("<") or not message:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{exc.operation_name} answered HTTP {status}"
    return f"{exc.operation_name}: {error.get('Code')}: {message.splitlines()[0][:120]}"


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _trusts_sagemaker(document: Any) -> bool:
    """Whether a trust policy lets sagemaker.amazonaws.com assume the role."""
    for statement in _as_list(document.get("Statement", [])):
        actions = _as_list(statement.get("Action", []))
        principal = statement.get("Principal", {})
        services = _as_list(principal.get("Service", [])) if isinstance(principal, dict) else []
        if (
            statement.get("Effect") == "Allow"
            and any(action in ("sts:AssumeRole", "sts:*", "*") for action in actions)
            and "sagemaker.amazonaws.com" in services
        ):
            return True
    return False


class _Doctor:
    """The checks, in the order a user meets them; each yields its rows."""

    def __init__(self, aws: Aws, plan: Plan) -> None:
        self.aws = aws
        self.plan = plan
        self.common = aws.common
        self.region = aws.region

    def client(self, service: str) -> Any:
        return self.aws.boto.client(service, config=_CLIENT_CONFIG)

    def role(self, account: str) -> Iterator[Row]:
        try:
            arn = self.common.need("role")
        except LaunchError as exc:
            yield Row("execution role", FAIL, str(exc))
            return
        name = arn.rsplit("/", 1)[-1]
        try:
            role = self.client("iam").get_role(RoleName=name)["Role"]
        except ClientError as exc:
            if _code(exc) == "NoSuchEntity":
                yield Row(
                    "execution role",
                    FAIL,
                    f"no role {name} in account {account}: create one for SageMaker (IAM > Roles "
                    "> Create role > SageMaker) and pass its ARN with --role",
                )
            else:
                yield Row("execution role", UNKNOWN, f"{_why(exc)}; check IAM > Roles > {name}")
            return
        yield Row("execution role", OK, role["Arn"])
        if _trusts_sagemaker(role["AssumeRolePolicyDocument"]):
            yield Row("role trusts SageMaker", OK, "sagemaker.amazonaws.com may assume it")
        else:
            yield Row(
                "role trusts SageMaker",
                FAIL,
                f"SageMaker may not assume {name}: add to its trust policy (IAM > Roles > {name} > "
                'Trust relationships) {"Effect": "Allow", "Principal": {"Service": '
                '"sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}',
            )
        yield from self.role_reaches_bucket(role["Arn"])

    def role_reaches_bucket(self, role_arn: str) -> Iterator[Row]:
        bucket = self.common.bucket
        if not bucket:
            return  # SageMaker's default bucket: the managed policies grant it by its name
        objects = f"arn:aws:s3:::{bucket}/{self.common.prefix}/doctor"
        wanted = {
            f"arn:aws:s3:::{bucket}": ["s3:ListBucket"],
            objects: ["s3:GetObject", "s3:PutObject"],
        }
        denied = []
        iam = self.client("iam")
        try:
            for resource, actions in wanted.items():
                answer = iam.simulate_principal_policy(
                    PolicySourceArn=role_arn, ActionNames=actions, ResourceArns=[resource]
                )
                denied += [
                    r["EvalActionName"]
                    for r in answer["EvaluationResults"]
                    if r["EvalDecision"] != "allowed"
                ]
        except _UNANSWERED as exc:
            yield Row(
                "role reaches bucket",
                UNKNOWN,
                f"{_why(exc)}; check that it may s3:ListBucket, GetObject, PutObject on {bucket}",
            )
            return
        if denied:
            yield Row(
                "role reaches bucket",
                FAIL,
                f"the role may not {', '.join(denied)} on {bucket}: attach a policy allowing them "
                "(AmazonSageMakerFullAccess covers only buckets with 'sagemaker' in the name)",
            )
        else:
            yield Row("role reaches bucket", OK, f"s3:ListBucket, GetObject, PutObject on {bucket}")

    def bucket(self, account: str) -> Iterator[Row]:
        named = self.common.bucket
        bucket = named or f"sagemaker-{self.region}-{account}"  # the SDK's default_bucket()
        try:
            answer = self.client("s3").get_bucket_location(Bucket=bucket)
        except ClientError as exc:
            if _code(exc) != "NoSuchBucket":
                yield Row(
                    "bucket",
                    UNKNOWN,
                    f"{_why(exc)}; if {bucket} is not yours, choose another (names are global)",
                )
            elif named:
                yield Row(
                    "bucket",
                    FAIL,
                    f"no bucket {bucket}: create it (aws s3 mb s3://{bucket} --region "
                    f"{self.region}) or pass --bucket with an existing one",
                )
            else:
                yield Row("bucket", OK, f"{bucket} (SageMaker's default): created on first use")
            return
        where = {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(
            answer.get("LocationConstraint"), answer.get("LocationConstraint")
        )
        if where != self.region:
            yield Row(
                "bucket in region",
                FAIL,
                f"{bucket} is in {where}, the jobs in {self.region}: SageMaker reads and writes S3 "
                f"in its own region; use a bucket in {self.region} (or --region {where})",
            )
        else:
            yield Row("bucket in region", OK, f"{bucket} in {where}")

    def image(self) -> Iterator[Row]:
        try:
            uri = self.common.need("image_uri")
        except LaunchError as exc:
            yield Row("image in ECR", FAIL, str(exc))
            return
        parts = ECR_URI.fullmatch(uri)
        if parts is None:
            yield Row("image in ECR", FAIL, f"{uri} is not an ECR image URI: {_PUSH}")
            return
        if parts["region"] != self.region:
            yield Row(
                "image in ECR",
                FAIL,
                f"the image is in {parts['region']}, the jobs in {self.region}: SageMaker pulls "
                f"from its own region; push there (./push_to_ecr.sh --region {self.region})",
            )
            return
        image_id = (
            {"imageDigest": parts["digest"]}
            if parts["digest"]
            else {"imageTag": parts["tag"] or "latest"}
        )
        ecr = self.client("ecr")
        repository = {"registryId": parts["account"], "repositoryName": parts["repository"]}
        try:
            answer = ecr.batch_get_image(
                **repository, imageIds=[image_id], acceptedMediaTypes=list(MANIFEST_TYPES)
            )
        except ClientError as exc:
            if _code(exc) == "RepositoryNotFoundException":
                yield Row("image in ECR", FAIL, f"no repository {parts['repository']}: {_PUSH}")
            else:
                by_hand = f"aws ecr describe-images --repository-name {parts['repository']}"
                yield Row("image in ECR", UNKNOWN, f"{_why(exc)}; check with {by_hand}")
            return
        if not answer["images"]:
            reason = "; ".join(f["failureReason"] for f in answer.get("failures", []))
            yield Row("image in ECR", FAIL, f"{uri}: {reason or 'not found'}: {_PUSH}")
            return
        image = answer["images"][0]
        manifest = json.loads(image["imageManifest"])
        media_type = image.get("imageManifestMediaType") or manifest.get("mediaType", "")
        if media_type != DOCKER_V2:
            platforms = ", ".join(
                "{os}/{architecture}".format(**m["platform"])
                for m in manifest.get("manifests", [])
                if "platform" in m
            )
            kind = "an image index / manifest list" if "manifests" in manifest else "a manifest"
            found = f"{kind} of type {media_type}" + (f" ({platforms})" if platforms else "")
            yield Row(
                "image in ECR", FAIL, f"{found}: SageMaker accepts only a Docker v2 one; {_PUSH}"
            )
            return
        digest = str(image["imageId"].get("imageDigest", ""))[:19]
        yield Row("image in ECR", OK, f"a Docker v2 manifest ({digest}...)")
        yield self.platform(ecr, repository, manifest["config"]["digest"], uri)

    def platform(self, ecr: Any, repository: dict[str, str], digest: str, uri: str) -> Row:
        """Its config blob says what it was built for: SageMaker's hosts are linux/amd64."""
        try:
            config = fetch_config(ecr, repository, digest)
        except _UNANSWERED as exc:
            by_hand = f"docker buildx imagetools inspect {uri}"
            return Row("image platform", UNKNOWN, f"{_why(exc)}; check with {by_hand}")
        except (httpx.HTTPError, ValueError) as exc:
            return Row("image platform", UNKNOWN, f"cannot read its config: {exc}")
        platform = f"{config.get('os')}/{config.get('architecture')}"
        if platform != "linux/amd64":
            return Row("image platform", FAIL, f"built for {platform}; SageMaker runs x86: {_PUSH}")
        return Row("image platform", OK, platform)

    def quotas(self) -> Iterator[Row]:
        wanted = {
            "training quota": f"{self.plan.training_type} for training job usage",
            "hosting quota": f"{self.plan.hosting_type} for endpoint usage",
        }
        console = "Service Quotas console > Amazon SageMaker"
        try:
            pages = self.client("service-quotas").get_paginator("list_service_quotas")
            found = {
                quota["QuotaName"]: quota.get("Value", 0.0)
                for page in pages.paginate(ServiceCode="sagemaker")
                for quota in page["Quotas"]
            }
        except _UNANSWERED as exc:
            for check, name in wanted.items():
                yield Row(check, UNKNOWN, f"{_why(exc)}; check in the {console} > '{name}'")
            return
        for check, name in wanted.items():
            if name not in found:
                yield Row(check, UNKNOWN, f"no quota '{name}' in {self.region}: {console}")
            elif found[name] <= 0:
                yield Row(
                    check,
                    FAIL,
                    f"'{name}' is 0: request an increase ({console}), or pick another type",
                )
            else:
                yield Row(check, OK, f"'{name}' = {found[name]:g}")

    def hosting_ami(self) -> Row:
        """The driver `launch deploy` will get for the image's CUDA (launch.image reads it)."""
        check = "hosting GPU driver"
        kind = self.plan.hosting_type
        family = gpu_family(kind)
        if family is None:
            return Row(check, OK, f"{kind} has no NVIDIA GPU: no GPU AMI needed")
        label = read_label(self.common.image_uri, self.aws.boto) if self.common.image_uri else None
        if label is not None and label.cuda is not None:
            cuda, whence = label.cuda, f"CUDA from {label.source}"
        else:
            cuda = DEFAULT_IMAGE_CUDA
            whence = f"CUDA {cuda} assumed (the Dockerfile's default): the image's label is unread"
        if cuda == CPU:
            return Row(
                check,
                FAIL,
                f"the image is a CPU build on a {family.gpu} host: push the CUDA build, or "
                "deploy on a CPU type (--hosting-instance-type ml.c5.xlarge)",
            )
        named = self.plan.inference_ami
        try:
            ami = (
                refuse_ami(ENDPOINT.amis, named, kind, cuda)
                if named
                else choose_ami(ENDPOINT.amis, kind, cuda)
            )
        except DriverError as exc:
            return Row(check, FAIL, f"[deploy] inference_ami_version: {exc}" if named else str(exc))
        who = "as [deploy] names it" if named else "which launch deploy names"
        return Row(check, OK, f"{ami_line(ENDPOINT.field, ami, kind, cuda)}, {who}; {whence}")

    def debugger(self) -> Row:
        mode = self.plan.debugger
        check = f"--debugger {mode}"
        if mode == "off":
            return Row(check, OK, "no Debugger service; the job still checks the rules itself")
        if self.region in DEBUGGER_UNSUPPORTED_REGIONS:
            if mode == "service":
                return Row(check, FAIL, f"Debugger is not offered in {self.region}: use auto")
            return Row(check, OK, f"Debugger is not offered in {self.region}: jobs go without it")
        if mode == "service":
            return Row(
                check,
                OK,
                "launch train asks for Debugger and fails if this account lacks it (closed to "
                "accounts new since 2026-07-30); auto would go on without it",
            )
        return Row(
            check,
            OK,
            "launch train asks for Debugger's hook, rules and profiler; if this account lacks "
            "Debugger (closed to accounts new since 2026-07-30) CreateTrainingJob refuses them "
            "and the job is started once more without; the job checks the rules itself either "
            "way (launch report shows them)",
        )


def diagnose(common: Common, plan: Plan) -> Iterator[Row]:
    """Every check's rows; credentials and region first, since every other check needs them."""
    try:
        aws = Aws.connect(common)
    except NoRegionError as exc:
        yield Row("region", FAIL, explain(exc))
        return
    yield Row("region", OK, aws.region)
    doctor = _Doctor(aws, plan)
    try:
        identity = doctor.client("sts").get_caller_identity()
    except _UNANSWERED as exc:
        yield Row("credentials", FAIL, explain(exc))
        return
    account = str(identity["Account"])
    yield Row("credentials", OK, f"{identity['Arn']} (account {account})")
    yield from doctor.role(account)
    yield from doctor.bucket(account)
    yield from doctor.image()
    yield from doctor.quotas()
    yield doctor.hosting_ami()
    yield doctor.debugger()


def render(rows: list[Row], width: int) -> str:
    """A plain-text table for a terminal `width` wide: the last column wraps."""
    cells = [("check", "result", "what to do"), *((r.check, r.result, r.todo) for r in rows)]
    first = max(len(check) for check, _, _ in cells)
    second = max(len(result) for _, result, _ in cells)
    last = max(30, width - first - second - 4)
    lines = []
    for n, (check, result, todo) in enumerate(cells):
        wrapped = textwrap.wrap(todo, last, break_long_words=False, break_on_hyphens=False) or [""]
        lines.append(f"{check:<{first}}  {result:<{second}}  {wrapped[0]}")
        lines += [" " * (first + second + 4) + more for more in wrapped[1:]]
        if n == 0:
            lines.append(f"{'-' * first}  {'-' * second}  {'-' * min(last, 40)}")
    return "\n".join(lines)


def run(args: argparse.Namespace, common: Common) -> int:
    rows = list(diagnose(common, _plan(args)))
    print(render(rows, shutil.get_terminal_size((100, 24)).columns))
    return 1 if any(row.result == FAIL for row in rows) else 0
