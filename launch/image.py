"""What the image was built for, and so which GPU driver, AMI and device its SageMaker hosts need.

With no AMI named, SageMaker's real-time and batch hosts of ml.g4dn, g5, p4d and p4de run NVIDIA
driver 470 (CUDA 11.4), and SageMaker never picks an AMI by itself (AWS docs, "Best practices to
minimize interruptions during GPU driver upgrades"), so an image built for CUDA 12 or 13 gets a GPU
it cannot use. `deploy` and `transform` therefore read the CUDA version the image was built for and
name an AMI whose driver runs it (container.gpu_drivers holds the table).

The Dockerfile writes that version into the label `sagemaker-dog-classifier.cuda`. It is read from
the local docker engine when the image is there (push_to_ecr.sh leaves the pushed tag in it), else
from the image's config in ECR: BatchGetImage gives the manifest, whose `config.digest` names the
config blob; GetDownloadUrlForLayer gives a URL for that blob, and its JSON holds
`config.Labels` (ECR API reference; OCI image spec, "Image Configuration"). When neither answers,
one line says so and the Dockerfile's default is assumed; `--image-cuda` says it instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
from botocore.exceptions import BotoCoreError, ClientError

from container.gpu_drivers import (
    CPU,
    DEFAULT_IMAGE_CUDA,
    IMAGE_CUDA_LABEL,
    INFERENCE_AMIS,
    TRANSFORM_AMIS,
    Ami,
    DriverError,
    ami_line,
    check_cuda,
    choose_ami,
    gpu_family,
    refuse_ami,
)
from launch.errors import LaunchError

__all__ = [
    "BATCH",
    "DOCKER_V2",
    "ECR_URI",
    "ENDPOINT",
    "MANIFEST_TYPES",
    "SERVE_DEVICE",
    "AmiSetting",
    "HostPlan",
    "Label",
    "add_host_arguments",
    "fetch_config",
    "image_cuda",
    "plan_host",
    "read_label",
]

SERVE_DEVICE = "SERVE_DEVICE"
"""The serving setting that, set to "cuda", makes /ping fail when no GPU is usable."""

ECR_URI = re.compile(
    r"(?P<account>[0-9]{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?"
    r"/(?P<repository>[^:@]+)(?::(?P<tag>[^@]+))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
"""An ECR image URI: ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY[:TAG][@DIGEST]."""
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
"""The one manifest type SageMaker runs (no OCI manifest, no image index)."""
MANIFEST_TYPES = (
    DOCKER_V2,
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
"""Every form ECR may hold, so that it answers with the stored one instead of converting."""
_TIMEOUT_S = 30

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AmiSetting:
    """One of SageMaker's two AMI settings: its API field, `launch`'s flag and the AMIs it takes."""

    field: str
    flag: str
    amis: tuple[Ami, ...]


ENDPOINT = AmiSetting("InferenceAmiVersion", "--inference-ami-version", INFERENCE_AMIS)
BATCH = AmiSetting("TransformAmiVersion", "--transform-ami-version", TRANSFORM_AMIS)


@dataclass(frozen=True)
class Label:
    """The image's CUDA label ("12.6", "13.0", "cpu"; None when unread) and where it came from,
    or why it could not be read."""

    cuda: str | None
    source: str


@dataclass(frozen=True)
class HostPlan:
    """What a model on an instance type gets: the AMI to name (None: none) and whether to serve
    with SERVE_DEVICE=cuda."""

    ami: str | None
    serve_on_gpu: bool


def add_host_arguments(parser: argparse.ArgumentParser, setting: AmiSetting) -> None:
    """The AMI flag (`setting.flag`) and `--image-cuda` of `deploy` and `transform`."""
    parser.add_argument(
        setting.flag,
        metavar="AMI",
        help=f"{setting.field}, the host AMI, which fixes the GPU driver: "
        + ", ".join(f"{ami.name} (driver {ami.driver})" for ami in setting.amis)
        + " (default on GPU types: the oldest whose driver runs the image's CUDA; none on CPU "
        "types)",
    )
    parser.add_argument(
        "--image-cuda",
        metavar="VERSION",
        help=f"the CUDA version the image was built for ({DEFAULT_IMAGE_CUDA}, 13.0 or {CPU}), "
        f"when its label {IMAGE_CUDA_LABEL} cannot be read from the local docker engine or ECR "
        "(default: the label, else the Dockerfile's default, "
        f"{DEFAULT_IMAGE_CUDA})",
    )


def _local_labels(image: str) -> dict[str, str] | None:
    """The image's labels in the local docker engine; None when there is no engine or no such
    image."""
    try:
        done = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return dict(json.loads(done.stdout) or {})


def _manifest(ecr: Any, ids: dict[str, str], image: dict[str, str]) -> dict[str, Any]:
    answer = ecr.batch_get_image(**ids, imageIds=[image], acceptedMediaTypes=list(MANIFEST_TYPES))
    if not answer["images"]:
        failure = answer["failures"][0]
        raise LookupError(f"{failure['failureCode']}: {failure['failureReason']}")
    return dict(json.loads(answer["images"][0]["imageManifest"]))


def _ecr_labels(image: str, boto: boto3.Session) -> dict[str, str]:
    """The labels in the image's config in ECR; LookupError saying why not."""
    found = ECR_URI.fullmatch(image)
    if found is None:
        raise LookupError("not an ECR image URI")
    ecr = boto.client("ecr", region_name=found["region"])
    ids = {"registryId": found["account"], "repositoryName": found["repository"]}
    wanted = {"imageDigest": found["digest"]} if found["digest"] else {}
    manifest = _manifest(ecr, ids, wanted or {"imageTag": found["tag"] or "latest"})
    if "manifests" in manifest:  # an image index: SageMaker's hosts are linux/amd64
        amd64 = [
            entry["digest"]
            for entry in manifest["manifests"]
            if entry.get("platform", {}).get("architecture") == "amd64"
        ]
        if not amd64:
            raise LookupError("its image index has no linux/amd64 image")
        manifest = _manifest(ecr, ids, {"imageDigest": amd64[0]})
    config = fetch_config(ecr, ids, manifest["config"]["digest"])
    return dict(config.get("config", {}).get("Labels") or {})


def fetch_config(ecr: Any, ids: dict[str, str], digest: str) -> dict[str, Any]:
    """An image's config blob (platform, labels) from ECR: a presigned URL, then a GET.
    Raises ClientError, httpx.HTTPError or ValueError when it cannot be had."""
    url = ecr.get_download_url_for_layer(**ids, layerDigest=digest)["downloadUrl"]
    config = httpx.get(url, timeout=_TIMEOUT_S, follow_redirects=True).raise_for_status().json()
    return dict(config)


def _client_error(exc: ClientError) -> str:
    """ECR's error code and message; only the call and status for a body that is not ECR's
    JSON (an HTML error page)."""
    error = exc.response.get("Error", {})
    message = " ".join(str(error.get("Message", "")).split())
    if not message or message.startswith("<"):
        return f"{exc.operation_name}: {error.get('Code', 'error')}"
    return f"{error.get('Code', '')}: {message}"


def read_label(image: str, boto: boto3.Session) -> Label:
    """The image's CUDA label, from the local docker engine, else from ECR."""
    labels = _local_labels(image)
    source = "the local docker engine"
    if labels is None:
        source = "ECR"
        try:
            labels = _ecr_labels(image, boto)
        except ClientError as exc:
            return Label(None, f"not in the local docker engine; ECR: {_client_error(exc)}")
        except (LookupError, BotoCoreError, httpx.HTTPError, ValueError, KeyError) as exc:
            return Label(None, f"not in the local docker engine; ECR: {exc}")
    value = labels.get(IMAGE_CUDA_LABEL)
    if value is None:
        return Label(None, f"the image in {source} has no such label (built before it existed?)")
    try:
        return Label(check_cuda(value), f"its label in {source}")
    except DriverError as exc:
        return Label(None, f"the label in {source} is not usable ({exc})")


def image_cuda(image: str, boto: boto3.Session, given: str | None) -> str:
    """The CUDA version the image was built for: `given` (--image-cuda), else its label, else the
    Dockerfile's default, said in one line."""
    if given is not None:
        try:
            return check_cuda(given)
        except DriverError as exc:
            raise LaunchError(f"--image-cuda {given}: {exc}") from exc
    label = read_label(image, boto)
    if label.cuda is not None:
        print(f"image built for CUDA {label.cuda} ({label.source})")
        return label.cuda
    logger.warning(
        "cannot read the image's %s label (%s): assuming CUDA %s, the Dockerfile's default; "
        "pass --image-cuda if it was built otherwise",
        IMAGE_CUDA_LABEL,
        " ".join(label.source.split()),
        DEFAULT_IMAGE_CUDA,
    )
    return DEFAULT_IMAGE_CUDA


def plan_host(
    instance_type: str, given_ami: str | None, setting: AmiSetting, cuda: Callable[[], str]
) -> HostPlan:
    """The AMI and device for a model on `instance_type`, the image's CUDA read (by calling
    `cuda`) only for GPU types. The choice is printed with its reason; a named AMI whose driver
    cannot run the image is a LaunchError saying which to name."""
    family = gpu_family(instance_type)
    if family is None:
        if given_ami:
            raise LaunchError(
                f"{instance_type} has no NVIDIA GPU: drop {setting.flag} {given_ami} "
                "(GPU AMIs are for GPU instance types)"
            )
        return HostPlan(None, serve_on_gpu=False)
    built = cuda()
    if built == CPU:
        logger.warning(
            "the image is a CPU build: %s's %s would sit idle; use a CPU instance type "
            "(e.g. ml.c5.xlarge) or the CUDA build",
            instance_type,
            family.gpu,
        )
        return HostPlan(given_ami, serve_on_gpu=False)
    try:
        if given_ami:
            ami = refuse_ami(setting.amis, given_ami, instance_type, built)
            print(
                f"{setting.field}={ami.name} (driver {ami.driver}) runs this image's CUDA {built}"
            )
        else:
            ami = choose_ami(setting.amis, instance_type, built)
            print(ami_line(setting.field, ami, instance_type, built))
    except DriverError as exc:
        raise LaunchError(f"{setting.flag}: {exc}" if given_ami else str(exc)) from exc
    return HostPlan(ami.name, serve_on_gpu=True)
