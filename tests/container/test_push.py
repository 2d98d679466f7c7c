"""push_to_ecr.sh as a user runs it: the real AWS CLI against moto_server, the real docker build and
push into a local registry (Debian's docker-registry) standing in for ECR."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.conftest import ROOT, background, free_port
from tests.container.conftest import BUILD_FLAGS, docker, image_id

SCRIPT = ROOT / "push_to_ecr.sh"
# SageMaker takes this manifest type only (no OCI manifest, no image index).
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


# The registry's blobs outlive the session, as docker's layer cache does: pushing the image's GBs
# into an empty registry costs minutes of gzip, the same every time, and proves nothing more about
# the script than a push whose layers are there (upload is docker's work, not the script's).
REGISTRY_STORAGE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "sagemaker-dog-classifier-tests"
    / "registry"
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local registry on a free port, its storage in REGISTRY_STORAGE; its HOST:PORT.

    docker allows plain HTTP to registries on 127.0.0.0/8, and with no auth configured the
    registry lets `docker login` succeed with any password. At the end what no tag names is
    garbage-collected (the storage keeps one image's blobs), and every local tag that names the
    registry is removed.
    """
    if shutil.which("docker-registry") is None:
        raise AssertionError("no docker-registry; run docker/engine.sh (make test does)")
    base = tmp_path_factory.mktemp("registry")
    host = f"127.0.0.1:{free_port()}"
    config = {  # YAML is a superset of JSON
        "version": "0.1",
        "storage": {
            "filesystem": {"rootdirectory": str(REGISTRY_STORAGE)},
            "delete": {"enabled": True},
        },
        "http": {"addr": host},
    }
    (base / "config.yml").write_text(json.dumps(config))
    try:
        args = ["docker-registry", "serve", str(base / "config.yml")]
        with background(args, base / "registry.log", f"http://{host}/v2/"):
            yield host
        collect = [
            "docker-registry",
            "garbage-collect",
            "--delete-untagged",
            str(base / "config.yml"),
        ]
        subprocess.run(collect, capture_output=True, check=True, timeout=600)
    finally:
        tags = docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        ours = [tag for tag in tags if tag.startswith(f"{host}/")]
        if ours:  # untags; a tag that a container's image holds on to stays (no force)
            docker("rmi", *ours, check=False)


def push(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=1200, check=False
    )


def ecr(env: Mapping[str, str]) -> Any:
    return boto3.client(
        "ecr",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.startswith(f"push_to_ecr.sh: {message}"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_push_creates_the_repository_pushes_the_version_and_latest_and_prints_the_digest(
    image: str, registry: str, aws_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**aws_env, "DOCKER_CONFIG": str(tmp_path / "docker")}
    args = ("--registry", registry, "--repository", "dogs", "--tag", "v1", *BUILD_FLAGS)

    done = push(env, *args)

    assert done.returncode == 0, done.stderr
    reference, digest = done.stdout.removesuffix("\n").split("@")
    assert reference == f"{registry}/dogs"
    client = ecr(env)
    repository = client.describe_repositories(repositoryNames=["dogs"])["repositories"][0]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repository["encryptionConfiguration"]["encryptionType"] == "AES256"
    # docker keeps base64("AWS:" + password) for the registry, as ECR's token is.
    token = client.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    auths = json.loads((tmp_path / "docker" / "config.json").read_text())["auths"]
    assert auths[registry]["auth"] == token
    assert image_id(f"{registry}/dogs:v1") == image_id(image)
    assert image_id(done.stdout.strip()) == image_id(image)  # the digest names it locally too
    with httpx.Client(base_url=f"http://{registry}/v2/dogs", follow_redirects=True) as hub:
        assert sorted(hub.get("/tags/list").json()["tags"]) == ["latest", "v1"]
        for tag in ("v1", "latest"):  # what the registry serves for either tag is the digest
            found = hub.get(f"/manifests/{tag}", headers={"Accept": DOCKER_MANIFEST})
            assert found.headers["Docker-Content-Digest"] == digest
        manifest = found.json()
        assert manifest["mediaType"] == DOCKER_MANIFEST
        config = hub.get(f"/blobs/{manifest['config']['digest']}").json()
        assert (config["os"], config["architecture"]) == ("linux", "amd64")

    again = push(env, *args)

    assert again.returncode == 0, again.stderr
    assert again.stdout == done.stdout  # the same image, so the same digest
    assert "Layer already exists" in again.stderr  # the registry has the blobs: no upload
    assert [r["repositoryName"] for r in client.describe_repositories()["repositories"]] == ["dogs"]


def test_dry_run_prints_pasteable_commands_and_changes_nothing(
    registry: str, aws_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**aws_env, "DOCKER_CONFIG": str(tmp_path / "docker")}
    version = subprocess.run(
        ["git", "describe", "--tags", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    image = f"{registry}/dry-dogs"

    done = push(env, "--dry-run", "--registry", registry, "--repository", "dry-dogs", *BUILD_FLAGS)

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{image}:{version}\n"
    shown = [line.removeprefix("+ ") for line in done.stderr.splitlines() if line.startswith("+ ")]
    create, login, build, *tag_and_push = shown
    assert "create-repository" in create
    assert login == (
        "aws ecr --region us-east-1 get-login-password"
        f" | docker login --username AWS --password-stdin {registry}"
    )
    assert build.startswith("docker build --platform linux/amd64 --build-arg BASE_IMAGE=")
    assert build.endswith(f"--tag {image}:{version} {ROOT}")
    assert tag_and_push == [
        f"docker tag {image}:{version} {image}:latest",
        f"docker push {image}:{version}",
        f"docker push {image}:latest",
    ]
    client = ecr(env)
    with pytest.raises(client.exceptions.RepositoryNotFoundException):
        client.describe_repositories(repositoryNames=["dry-dogs"])
    assert httpx.get(f"http://{registry}/v2/dry-dogs/tags/list").status_code == 404
    assert docker("image", "inspect", f"{image}:{version}", check=False).returncode != 0
    assert not (tmp_path / "docker").exists()  # no docker login

    # Pasted into a shell, the repository line does what the real run would.
    subprocess.run(["bash", "-c", create], env=env, capture_output=True, check=True)
    repository = client.describe_repositories(repositoryNames=["dry-dogs"])["repositories"][0]
    assert repository["imageScanningConfiguration"] == {"scanOnPush": True}


@pytest.mark.parametrize(
    ("left_out", "message"),
    [("aws", "the AWS CLI (aws) is not on PATH"), ("docker", "docker is not on PATH")],
)
def test_a_missing_tool_is_named(
    left_out: str, message: str, aws_env: dict[str, str], tmp_path: Path
) -> None:
    # A PATH of links to the tools the script needs, less one.
    for tool in {"bash", "dirname", "aws", "docker"} - {left_out}:
        found = shutil.which(tool, path=aws_env["PATH"])
        assert found is not None, tool
        (tmp_path / tool).symlink_to(found)

    done = push({**aws_env, "PATH": str(tmp_path)}, "--dry-run")

    assert_one_line_error(done, message)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"AWS_DEFAULT_REGION": None}, "no AWS region: pass --region"),
        (
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
            "no working AWS credentials: run 'aws configure'",
        ),
        # One attempt: the CLI's retries would only make the test wait.
        (
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_MAX_ATTEMPTS": "1"},
            "no working AWS credentials",
        ),
        ({"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, "no docker engine answers"),
    ],
    ids=["no-region", "no-credentials", "unreachable-endpoint", "no-docker-engine"],
)
def test_what_stops_a_push_is_said_in_one_line(
    changes: dict[str, str | None], message: str, aws_env: dict[str, str]
) -> None:
    env = {k: v for k, v in {**aws_env, **changes}.items() if v is not None}

    done = push(env, "--dry-run")

    assert_one_line_error(done, message)
