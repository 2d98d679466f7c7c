"""The real image, built from the real Dockerfile, and ways to run it on an /opt/ml tree.

`make test` starts a docker engine and makes the base image first (docker/engine.sh,
docker/base-image.sh); the build here uses that base, torch from the package index the machine
has (PyPI's build), and no baked weights, as a build behind no registry and no weights host must.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from container.sagemaker_env import OptMl
from tests.conftest import FAST, ROOT, Job

BASE_IMAGE = os.environ.get("TEST_BASE_IMAGE", "byoc-base:bookworm")
TAG = "byoc:test"
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
    docker(
        "build",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg", "TORCH_INDEX_URL=",
        "--build-arg", "TORCH_CUDA=13.0",  # PyPI's torch
        "--build-arg", "BAKE_WEIGHTS=0",
        "--tag", TAG,
        str(ROOT),
        timeout=_BUILD_TIMEOUT_S,
    )  # fmt: skip
    return TAG


@dataclass(frozen=True)
class Container:
    """`docker run` of the image with an /opt/ml tree mounted at /opt/ml."""

    image: str
    opt_ml: Path

    def args(self, *options: str) -> list[str]:
        return ["run", "--rm", "--volume", f"{self.opt_ml}:/opt/ml", *options, self.image]

    def run(self, command: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return docker(*self.args(), *command, timeout=timeout, check=False)


def training_job(base: Path, dataset: Path) -> Job:
    """An /opt/ml tree under `base` with the sample dataset in train/valid/test, quick settings."""
    job = Job(OptMl(base / "opt_ml"))
    shutil.copytree(dataset, job.opt_ml.data_dir)
    job.set_channels("train", "valid", "test")
    job.set_hyperparameters(FAST, image_size=64, epochs=3, lr=0.02)
    return job
