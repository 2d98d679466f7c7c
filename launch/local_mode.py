"""The SageMaker SDK's local mode: the image run by the local docker engine instead of SageMaker.

`instance_type="local"` (or "local_gpu") with a `LocalSession` makes the SDK start the image with
docker compose, publish its port 8080 on the host and send it what SageMaker would. What it needs is
checked here first (docker answering, the image there); it gets a free host port rather than 8080,
which a `serve` or `docker run -p 8080:8080` on the same laptop often holds; and the stopped
containers the SDK leaves behind are removed.
"""

from __future__ import annotations

import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from sagemaker.local.local_session import LocalSession
from sagemaker.utils import ECR_URI_PATTERN

from launch.errors import LaunchError

__all__ = ["INSTANCE_TYPES", "ROLE", "is_local", "session"]

INSTANCE_TYPES = ("local", "local_gpu")

ROLE = "arn:aws:iam::000000000000:role/local-mode"
"""What the SDK's Model wants as a role in local mode, where nothing assumes it."""

_WORKING_DIR_LABEL = "com.docker.compose.project.working_dir"


def is_local(instance_type: str) -> bool:
    return instance_type in INSTANCE_TYPES


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LaunchError("local mode runs the image with docker: install it") from exc


def _check_image(image: str) -> None:
    """The image is in the local engine, or is an ECR URI the SDK pulls itself."""
    inspect = _docker("image", "inspect", "--format", "{{.Id}}", image)
    if inspect.returncode == 0:
        return
    problem = inspect.stderr.strip().splitlines()[-1] if inspect.stderr.strip() else ""
    if "no such image" not in problem.lower():
        raise LaunchError(f"docker cannot inspect {image}: {problem} (is the engine running?)")
    if not re.match(ECR_URI_PATTERN, image):
        raise LaunchError(
            f"image {image} is not in the local docker engine: build it "
            f"(docker build -t {image} .) or pass --image-uri with one that is"
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _remove_containers(image: str, root: Path) -> None:
    """The containers of the SDK's compose projects under `root`: stopped ones, and after a failure
    a running one, stopped first (SIGTERM: compose and the SDK's thread then end quietly)."""
    listed = _docker(
        "ps", "--all", "--filter", f"ancestor={image}",
        "--format", f'{{{{.ID}}}} {{{{.Label "{_WORKING_DIR_LABEL}"}}}}',
    )  # fmt: skip
    ours = [
        line.split(" ", 1)[0]
        for line in listed.stdout.splitlines()
        if line.partition(" ")[2].startswith(str(root))
    ]
    if ours:
        _docker("stop", *ours)
        _docker("rm", *ours)


@contextmanager
def session(image: str, region: str | None) -> Iterator[LocalSession]:
    """A LocalSession that serves on a free host port and keeps its files under a temporary
    folder; no AWS credentials needed for file:// data. Its containers are removed on exit."""
    _check_image(image)
    with tempfile.TemporaryDirectory(prefix="launch-local-") as tmp:
        root = Path(tmp).resolve()
        # The SDK needs a region to build its clients; local mode sends nothing to it.
        local = LocalSession(boto_session=boto3.Session(region_name=region or "us-east-1"))
        config = dict(local.config or {})
        config["local"] = {
            **config.get("local", {}),
            "serving_port": _free_port(),
            "container_root": str(root),
        }
        local.config = config
        try:
            yield local
        finally:
            _remove_containers(image, root)
