"""`launch` as a user runs it: a real process, against moto_server (a real AWS API on 127.0.0.1).

What SageMaker would receive is read back from moto with boto3 (describe_* of what was created).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.conftest import ROOT
from tests.serving.conftest import server  # noqa: F401 (a served model, shared)

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-dog-classifier:test"


@dataclass
class Launch:
    """Runs `python -m launch` with an environment aimed at moto, in a working folder of its own."""

    env: dict[str, str]
    cwd: Path
    common: list[str] = field(default_factory=lambda: ["--role", ROLE, "--image-uri", IMAGE_URI])

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`launch COMMAND ARGS... --role ROLE --image-uri URI`; its exit status is not checked."""
        return subprocess.run(
            [sys.executable, "-m", "launch", *args, *self.common],
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self(*args)
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        return done

    def sent(self, target: str) -> list[dict[str, Any]]:
        """The JSON bodies of the requests moto received since the test began whose X-Amz-Target
        is `target` (e.g. "SageMaker.CreateTrainingJob"): what SageMaker would have received."""
        url = f"{self.env['AWS_ENDPOINT_URL']}/moto-api/recorder/download-recording"
        bodies = []
        for line in httpx.get(url).text.splitlines():
            entry = json.loads(line)
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            if headers.get("x-amz-target") == target:
                body = entry["body"]
                bodies.append(json.loads(base64.b64decode(body) if entry["body_encoded"] else body))
        return bodies

    def client(self, service: str) -> Any:
        """A boto3 client on moto, to read back what the command created."""
        session = boto3.Session(
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )
        return session.client(service, endpoint_url=self.env["AWS_ENDPOINT_URL"])


@pytest.fixture
def launch(aws_env: dict[str, str], sagemaker_sdk_env: dict[str, str], tmp_path: Path) -> Launch:
    """`launch` against a freshly reset moto with fake credentials, the SDK's telemetry off, run
    from a folder of its own."""
    for reset in ("reset", "recorder/reset-recording"):
        httpx.post(f"{aws_env['AWS_ENDPOINT_URL']}/moto-api/{reset}").raise_for_status()
    env = {**aws_env, **sagemaker_sdk_env, "PYTHONPATH": str(ROOT)}
    work = tmp_path / "work"
    work.mkdir()
    return Launch(env, work)


@pytest.fixture
def bucket(launch: Launch) -> str:
    """A bucket in moto for the command's data and artifacts (pass it as --bucket)."""
    launch.client("s3").create_bucket(Bucket="launch-bucket")
    return "launch-bucket"


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error of a failed command: exit status 1, one `launch: ...` line on stderr and
    nothing else (no traceback, no log chatter)."""
    assert done.returncode == 1, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    (line,) = done.stderr.splitlines()
    assert line.startswith("launch: "), done.stderr
    return line
