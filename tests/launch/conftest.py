"""`launch` against moto_server (a real AWS API on 127.0.0.1), run in the test's own process:
`launch.cli.main(argv)` with the environment, working folder, stdin, stdout and stderr a user's
process would have (a process of its own costs seconds of SDK import; test_process.py runs the
real one, `python -m launch`, and proves that what runs here is what a user gets).

What SageMaker would receive is read back from moto with boto3 (describe_* of what was created).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from launch.cli import main
from tests.conftest import ROOT
from tests.serving.conftest import server  # noqa: F401 (a served model, shared)

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-dog-classifier:test"


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ is `env` and nothing else, as a process started with it would have it; restored
    whole afterwards (including what the command set: SAGEMAKER_SUPPRESS_V2_WARNING)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _stdin(text: str) -> Iterator[None]:
    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


@dataclass
class Launch:
    """Runs `launch` with an environment aimed at moto, in a working folder of its own."""

    env: dict[str, str]
    cwd: Path
    common: list[str] = field(default_factory=lambda: ["--role", ROLE, "--image-uri", IMAGE_URI])

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """`launch COMMAND ARGS... --role ROLE --image-uri URI` with `stdin` as its input; its exit
        status (main's, or argparse's SystemExit) is not checked. An exception that main() lets
        through fails the test with its traceback, as the process would have died of it."""
        argv = [*args, *self.common]
        stdout, stderr = io.StringIO(), io.StringIO()
        with (
            _environment({**self.env, **(env or {})}),
            contextlib.chdir(self.cwd),
            _stdin(stdin),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            try:
                status = main(argv)
            except SystemExit as exc:  # argparse: --help, or a usage error
                status = int(exc.code or 0)
        return subprocess.CompletedProcess(
            ["launch", *argv], status, stdout.getvalue(), stderr.getvalue()
        )

    def process(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The same command as a process of its own, `python -m launch`, as a user runs it."""
        return subprocess.run(
            [sys.executable, "-m", "launch", *args, *self.common],
            cwd=self.cwd,
            env={**self.env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def ok(
        self, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = self(*args, env=env)
        assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        return done

    def _recording(self) -> Iterator[dict[str, Any]]:
        """Every request moto received since the test began, as its recorder wrote it down."""
        url = f"{self.env['AWS_ENDPOINT_URL']}/moto-api/recorder/download-recording"
        for line in httpx.get(url).text.splitlines():
            yield json.loads(line)

    def sent(self, target: str) -> list[dict[str, Any]]:
        """The JSON bodies of the requests moto received since the test began whose X-Amz-Target
        is `target` (e.g. "SageMaker.CreateTrainingJob"): what SageMaker would have received."""
        bodies = []
        for entry in self._recording():
            headers = {k.lower(): v for k, v in entry["headers"].items()}
            if headers.get("x-amz-target") == target:
                body = entry["body"]
                bodies.append(json.loads(base64.b64decode(body) if entry["body_encoded"] else body))
        return bodies

    def received(self, path: str) -> list[dict[str, str]]:
        """The headers (lower-case names) of the requests moto received since the test began
        whose URL path ends with `path`: what a REST API such as SageMaker Runtime's received."""
        return [
            {k.lower(): v for k, v in entry["headers"].items()}
            for entry in self._recording()
            if httpx.URL(entry["url"]).path.endswith(path)
        ]

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
    work = tmp_path / "work"
    work.mkdir()
    return Launch({**aws_env, **sagemaker_sdk_env}, work)


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


class StandInHandler(BaseHTTPRequestHandler):
    """The base of a stand-in for an AWS API in front of moto (what moto lacks, or a refusal
    SageMaker would give): `post(body)` and `get()` to override, helpers to answer a request or
    pass it on, and no log line per request."""

    def do_GET(self) -> None:
        self.get()

    def do_POST(self) -> None:
        self.post(self.rfile.read(int(self.headers["Content-Length"])))

    def get(self) -> None:
        self.send_error(501)  # what http.server answers a method its handler lacks

    def post(self, body: bytes) -> None:
        self.send_error(501)

    def answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def forward(self, url: str, body: bytes) -> None:
        """POST the request, headers and all, to the same path at `url` (moto); its answer."""
        skip = {"host", "content-length"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        answer = httpx.post(url + self.path, content=body, headers=headers, timeout=30)
        self.answer(answer.status_code, answer.headers["content-type"], answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def stand_in(handler: type[StandInHandler]) -> Iterator[str]:
    """`handler` serving on a free port of 127.0.0.1, in a thread of this process; its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()
