"""The real `serve` process on free ports, serving the model `trained` (tests/conftest.py)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from container.sagemaker_env import OptMl
from tests.conftest import ROOT, _free_port

SERVE = ROOT / "serve"


@dataclass
class Server:
    """A `serve` process; `stop()` sends SIGTERM and returns its exit code."""

    process: subprocess.Popen[str]
    port: int
    log: Path
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text()

    def memory(self) -> int:
        """Resident bytes of the server and its child processes (the decoders), from /proc."""
        return sum(_rss(pid) for pid in _family(self.process.pid))

    def wait_until(self, status: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if self.client.get("/ping").status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"/ping never answered {status}:\n{self.logs()}")

    def stop(self, timeout: float = 30) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def post(
        self, body: bytes, content_type: str | None = "image/jpeg", **headers: str
    ) -> httpx.Response:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if content_type is not None:
            sent["Content-Type"] = content_type
        return self.client.post("/invocations", content=body, headers=sent)


def _family(pid: int) -> list[int]:
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += _family(int(child))
    return found


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0  # it has just exited
    return next(
        int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
    )


def start_server(base: Path, log: Path, env: Mapping[str, str] | None = None) -> Server:
    port = _free_port()
    environment = {
        **os.environ,
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        **(env or {}),
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(SERVE)],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return Server(process, port, log)


@contextmanager
def serving(base: Path, log: Path, env: Mapping[str, str] | None = None) -> Iterator[Server]:
    """A server on `base`, once `/ping` says 200; stopped at the end, where it must exit 0."""
    running = start_server(base, log, env)
    try:
        running.wait_until(200)
        yield running
    finally:
        assert running.stop() == 0


@pytest.fixture(scope="session")
def server(trained: OptMl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with default settings, shared by the tests that only send requests."""
    running = start_server(trained.base, tmp_path_factory.mktemp("server") / "serve.log")
    running.wait_until(200)
    yield running
    assert running.stop() == 0


def jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", **options)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(60, 180, (height, width, 3)).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="session")
def test_images(trained: OptMl) -> list[Path]:
    """The held-out images of the trained model (the test channel), JPEGs and PNGs."""
    return sorted(p for p in trained.channel_dir("test").rglob("*") if p.is_file())
