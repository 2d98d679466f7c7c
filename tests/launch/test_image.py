"""The image's CUDA label read from ECR, and what `deploy` and `transform` make of it.

moto keeps ECR's repositories and manifests but does not implement GetDownloadUrlForLayer, so a
stand-in in front of it answers that one call, as ECR does, with a URL of the config blob (served
by the stand-in itself), and passes every other ECR call to moto. `launch` reaches it through
boto3's per-service endpoint setting, AWS_ENDPOINT_URL_ECR.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from launch.image import Label, read_label
from tests.launch.conftest import ROLE, Launch, StandInHandler, one_line_error, stand_in
from tests.launch.test_hosting import MODEL_DATA, deploy

LABEL = "sagemaker-dog-classifier.cuda"
REGISTRY = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
TARGET = "AmazonEC2ContainerRegistry_V20150921."


@dataclass
class Ecr:
    """moto's ECR behind the stand-in: the config blobs the stand-in serves, a boto3 client."""

    blobs: dict[str, bytes]
    client: Any

    def push(self, repository: str, labels: dict[str, str] | None, tag: str = "v1") -> str:
        """An image whose config holds `labels` (None: no Labels at all) in `repository`; its
        URI. The manifest is Docker v2, as push_to_ecr.sh pushes it; the layers are left out."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Labels": labels}})
        digest = "sha256:" + hashlib.sha256(config.encode()).hexdigest()
        self.blobs[digest] = config.encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": digest,
            },
            "layers": [],
        }
        self._put(repository, manifest, tag)
        return f"{REGISTRY}/{repository}:{tag}"

    def _put(self, repository: str, manifest: dict[str, Any], tag: str) -> str:
        repositories = self.client.describe_repositories()["repositories"]
        if repository not in {r["repositoryName"] for r in repositories}:
            self.client.create_repository(repositoryName=repository)
        body = json.dumps(manifest)
        digest = "sha256:" + hashlib.sha256(body.encode()).hexdigest()  # as a registry names it
        self.client.put_image(
            repositoryName=repository, imageManifest=body, imageTag=tag, imageDigest=digest
        )
        return digest

    def push_index(self, repository: str, image: str, tag: str) -> str:
        """An OCI image index whose linux/amd64 entry is `image` (pushed before, by digest)."""
        (pushed,) = self.client.batch_get_image(
            repositoryName=repository, imageIds=[{"imageTag": image.rpartition(":")[2]}]
        )["images"]
        entry = {"mediaType": DOCKER_MANIFEST, "size": len(pushed["imageManifest"])}
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**entry, "digest": "sha256:" + "a" * 64, "platform": {"architecture": "arm64"}},
                {
                    **entry,
                    "digest": pushed["imageId"]["imageDigest"],
                    "platform": {"architecture": "amd64", "os": "linux"},
                },
            ],
        }
        self._put(repository, index, tag)
        return f"{REGISTRY}/{repository}:{tag}"


@pytest.fixture
def ecr(launch: Launch) -> Iterator[Ecr]:
    moto = launch.env["AWS_ENDPOINT_URL"]
    blobs: dict[str, bytes] = {}

    class EcrStandIn(StandInHandler):
        def get(self) -> None:
            self.answer(200, "application/octet-stream", blobs[self.path.removeprefix("/blobs/")])

        def post(self, body: bytes) -> None:
            if self.headers["X-Amz-Target"] != TARGET + "GetDownloadUrlForLayer":
                self.forward(moto, body)
                return
            digest = json.loads(body)["layerDigest"]
            url = f"http://{self.headers['Host']}/blobs/{digest}"  # this stand-in's own
            answer = json.dumps({"downloadUrl": url, "layerDigest": digest}).encode()
            self.answer(200, "application/x-amz-json-1.1", answer)

    with stand_in(EcrStandIn) as url:
        launch.env["AWS_ENDPOINT_URL_ECR"] = url
        yield Ecr(blobs, launch.client("ecr"))


@pytest.fixture
def boto(launch: Launch, monkeypatch: pytest.MonkeyPatch) -> boto3.Session:
    """A boto3 session whose clients go to moto (ECR's to the stand-in, when there is one)."""
    for name, value in launch.env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return boto3.Session()


def test_the_label_is_read_from_the_image_config_in_ecr(ecr: Ecr, boto: boto3.Session) -> None:
    tagged = ecr.push("dogs", {LABEL: "13.0", "other": "x"})
    assert read_label(tagged, boto) == Label("13.0", "its label in ECR")

    (image,) = ecr.client.batch_get_image(repositoryName="dogs", imageIds=[{"imageTag": "v1"}])[
        "images"
    ]
    by_digest = f"{REGISTRY}/dogs@{image['imageId']['imageDigest']}"
    assert read_label(by_digest, boto) == Label("13.0", "its label in ECR")

    cpu = ecr.push("dogs", {LABEL: "cpu"}, tag="cpu")
    assert read_label(ecr.push_index("dogs", cpu, "multi"), boto) == Label(
        "cpu", "its label in ECR"
    )


def test_what_keeps_the_label_unread_is_said(ecr: Ecr, boto: boto3.Session) -> None:
    unlabelled = read_label(ecr.push("old", None), boto)
    assert unlabelled.cuda is None
    assert "the image in ECR has no such label" in unlabelled.source

    odd = read_label(ecr.push("odd", {LABEL: "twelve"}), boto)
    assert odd.cuda is None
    assert "the label in ECR is not usable (CUDA 'twelve': give a version such as" in odd.source

    missing = read_label(f"{REGISTRY}/nowhere:v1", boto)
    assert missing.cuda is None
    assert missing.source.startswith(
        "not in the local docker engine; ECR: RepositoryNotFoundException: "
    )

    absent_tag = read_label(f"{REGISTRY}/old:v9", boto)
    assert absent_tag.source.endswith("ECR: ImageNotFound: Requested image not found")

    local = read_label("dog-classifier:latest", boto)
    assert local == Label(None, "not in the local docker engine; ECR: not an ECR image URI")


def test_without_the_stand_in_moto_cannot_give_the_config(
    launch: Launch, boto: boto3.Session
) -> None:
    client = launch.client("ecr")
    client.create_repository(repositoryName="dogs")
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "x", "size": 2, "digest": "sha256:" + "0" * 64},
        "layers": [],
    }
    client.put_image(repositoryName="dogs", imageManifest=json.dumps(manifest), imageTag="v1")
    label = read_label(f"{REGISTRY}/dogs:v1", boto)
    assert label.cuda is None
    assert label == Label(None, "not in the local docker engine; ECR: GetDownloadUrlForLayer: 500")


def test_deploy_picks_the_ami_for_the_cuda_in_the_label(launch: Launch, ecr: Ecr) -> None:
    launch.common = ["--role", ROLE, "--image-uri", ecr.push("dogs", {LABEL: "13.0"})]

    done = deploy(launch, "--no-wait")

    assert done.stdout.startswith(
        "image built for CUDA 13.0 (its label in ECR)\n"
        "ml.g4dn.xlarge (T4) would get driver 470 (CUDA 11.4) by default; this image needs "
        "CUDA 13.0 -> driver 580+: InferenceAmiVersion=al2023-ami-sagemaker-inference-gpu-4-1 "
        "(driver 580)\n"
    )
    (request,) = launch.sent("SageMaker.CreateEndpointConfig")
    assert request["ProductionVariants"][0]["InferenceAmiVersion"] == (
        "al2023-ami-sagemaker-inference-gpu-4-1"
    )
    (model,) = launch.sent("SageMaker.CreateModel")
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_DEVICE": "cuda"}


def test_a_cpu_build_gets_no_ami_and_no_device_on_a_gpu_type(launch: Launch, ecr: Ecr) -> None:
    launch.common = ["--role", ROLE, "--image-uri", ecr.push("dogs-cpu", {LABEL: "cpu"})]

    done = deploy(launch, "--no-wait")

    assert (
        "the image is a CPU build: ml.g4dn.xlarge's T4 would sit idle; use a CPU instance type "
        "(e.g. ml.c5.xlarge) or the CUDA build"
    ) in done.stderr
    (request,) = launch.sent("SageMaker.CreateEndpointConfig")
    assert "InferenceAmiVersion" not in request["ProductionVariants"][0]
    (model,) = launch.sent("SageMaker.CreateModel")
    assert "SERVE_DEVICE" not in model["PrimaryContainer"].get("Environment", {})


def test_serverless_warns_about_a_cuda_build_by_its_label(launch: Launch, ecr: Ecr) -> None:
    image = ecr.push("dogs-cpu-named", {LABEL: "12.6"})  # "cpu" in the name, CUDA in the label
    launch.common = ["--role", ROLE, "--image-uri", image]

    done = deploy(launch, "--serverless", "--no-wait")

    assert "serverless has no GPU: deploy the CPU build of the image" in done.stderr
    assert f"{image} is built for CUDA 12.6" in done.stderr


def test_transform_of_a_named_model_reads_the_label_of_its_image(launch: Launch, ecr: Ecr) -> None:
    image = ecr.push("dogs", {LABEL: "13.0"})
    sagemaker = launch.client("sagemaker")
    sagemaker.create_model(
        ModelName="dogs-cuda13",
        ExecutionRoleArn=ROLE,
        PrimaryContainer={"Image": image, "ModelDataUrl": MODEL_DATA},
    )

    done = launch("transform", "--model", "dogs-cuda13", "--instance-type", "ml.g4dn.xlarge")

    assert done.stdout == "image built for CUDA 13.0 (its label in ECR)\n"
    assert one_line_error(done).startswith(
        "launch: no AMI runs this image's CUDA 13.0 (driver 580+) on ml.g4dn.xlarge (T4): "
    )
    assert sagemaker.list_transform_jobs()["TransformJobSummaries"] == []
