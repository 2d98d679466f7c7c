"""The real image, built from the real Dockerfile, and ways to run it and wait for it.

`make test` starts a docker engine and makes the base image first (docker/engine.sh,
docker/base-image.sh); the build here uses that base, torch from the package index the machine
has (PyPI's build), and no baked weights, as a build behind no registry and no weights host must.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import ROOT, free_port

TAG = "byoc:test"
BUILD_ARGS = {
    "BASE_IMAGE": os.environ.get("TEST_BASE_IMAGE", "byoc-base:bookworm"),
    "TORCH_INDEX_URL": "",  # PyPI's torch,
    "TORCH_CUDA": "13.0",  # which is built for CUDA 13.0
    "BAKE_WEIGHTS": "0",
}
"""The Dockerfile's build arguments for the tests' image. push_to_ecr.sh and docker-compose get the
same, so that their builds are all cache hits: the image they make is this one."""
BUILD_FLAGS = tuple(flag for k, v in BUILD_ARGS.items() for flag in ("--build-arg", f"{k}={v}"))
_BUILD_TIMEOUT_S = 1800


def docker(
    *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


@pytest.fixture(scope="session")
def image() -> str:
    """The image tag, built once per session (docker's layer cache makes rebuilds quick)."""
    if docker("info", check=False).returncode != 0:
        raise AssertionError("no docker engine answers; run docker/engine.sh (make test does)")
    docker("build", *BUILD_FLAGS, "--tag", TAG, str(ROOT), timeout=_BUILD_TIMEOUT_S)
    return TAG


def image_id(reference: str) -> str:
    return docker("image", "inspect", "--format", "{{.Id}}", reference).stdout.strip()


def containers_of(image: str) -> list[str]:
    """Every container of `image`, running or not (SageMaker's local mode leaves some behind)."""
    return docker("ps", "--all", "--quiet", "--filter", f"ancestor={image}").stdout.split()


def wait_for_ping(url: str, logs: Callable[[], str], timeout: float = 120) -> None:
    """Poll `url`/ping until it answers 200; fail with `logs()` (the server's) if it never does."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/ping", timeout=5).status_code
        except httpx.TransportError:
            status = None
        if status == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"/ping answered {status} for {timeout} s:\n{logs()}")


@contextmanager
def serving(image: str, *run_options: str) -> Iterator[tuple[str, str]]:
    """`docker run --detach` of the image's CMD on a free host port, healthy; (name, base URL).
    The container is removed at the end, however the test went."""
    port = free_port()
    name = f"serve-{port}"
    docker("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8080",
           *run_options, image)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, lambda: docker("logs", name, check=False).stderr)
        yield name, url
    finally:
        docker("rm", "--force", name, check=False)
