"""The server of the model `trained` (tests/conftest.py), two ways: its app in this process
(`in_process`, the `app` fixture), for what a client sends and gets; the real `serve` process on a
free port (`start_server`, `serving`, the `server` fixture), where a socket, uvicorn, signals,
exit codes or memory are the subject, or a client needs a URL (tests/launch)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from container.sagemaker_env import OptMl
from container.serving.app import create_app
from container.serving.settings import ENVIRONMENT, ServeSettings
from tests import forkserver
from tests.conftest import ROOT, free_port

SERVE = ROOT / "serve"


class Endpoint:
    """A server the tests talk HTTP to through `client`: a `serve` process or an app in this one."""

    client: httpx.Client

    def logs(self) -> str:
        raise NotImplementedError

    def check_running(self) -> None:
        """AssertionError once the server can no longer answer."""

    def post(
        self, body: bytes, content_type: str | None = "image/jpeg", **headers: str
    ) -> httpx.Response:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if content_type is not None:
            sent["Content-Type"] = content_type
        return self.client.post("/invocations", content=body, headers=sent)

    def wait_until(self, status: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            try:
                if self.client.get("/ping").status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"/ping never answered {status}:\n{self.logs()}")

    def log_lines(self, pattern: str, timeout: float = 60) -> list[str]:
        """The log lines that `pattern` (a regex) finds, once there is one."""
        deadline = time.monotonic() + timeout
        while not (found := [x for x in self.logs().splitlines() if re.search(pattern, x)]):
            assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{self.logs()}"
            time.sleep(0.05)
        return found


@dataclass
class Server(Endpoint):
    """A `serve` process; `stop()` sends SIGTERM and returns its exit code."""

    process: subprocess.Popen[str] | forkserver.Child
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

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.logs()}")

    def memory(self) -> int:
        """Resident bytes of the server and its child processes (the decoders), from /proc."""
        return sum(_rss(pid) for pid in _family(self.process.pid))

    def stop(self, timeout: float = 30) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


class _Lines(logging.Handler):
    """The lines logged on some threads (one app's: other apps may run meanwhile)."""

    def __init__(self, threads: set[int | None]) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.threads = threads
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread in self.threads:
            self.lines.append(self.format(record))


@dataclass
class App(Endpoint):
    """The app of a server process, run in this one (see `in_process`)."""

    client: httpx.Client
    _log: _Lines

    def logs(self) -> str:
        return "\n".join(self._log.lines)


class _OnLoop(httpx.BaseTransport):
    """Sends each request through httpx's ASGITransport on the app's event loop (a thread of
    its own, as uvicorn's would be), so that a client thread waits as it would on a socket."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
        self._asgi = httpx.ASGITransport(app)
        self._loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return asyncio.run_coroutine_threadsafe(send(), self._loop).result(timeout=120)


QUICK: dict[str, object] = {"optimize": "eager", "max_batch_size": 1, "precision": "fp32"}
"""Settings that load the model soonest (no tracing, no precisions timed, a warm-up of one
image), for the tests whose subject is not inference."""
QUICK_ENV = {ENVIRONMENT[name]: str(value) for name, value in QUICK.items()}
"""The same for a `serve` process."""


def serve_settings(trained: OptMl, **changes: object) -> ServeSettings:
    """The server's settings for the model `trained`: the defaults, but for `changes`."""
    return ServeSettings.model_validate({"base_dir": str(trained.base), **changes})


@contextmanager
def in_process(served: ServeSettings) -> Iterator[App]:
    """`create_app(served)` in this process, its lifespan run on an event loop thread: what a
    `serve` process answers, without the process (no socket, uvicorn or signal handlers; the
    decoder processes are children of pytest). Its log lines (INFO and up, from its event loop
    and its model thread) are kept."""
    app = create_app(served)
    # Its one model thread, started now to learn its id: the model loads there.
    model_thread = app.state.server.model_thread.submit(threading.get_ident).result()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="app-loop")
    thread.start()
    log = _Lines({thread.ident, model_thread})
    logger = logging.getLogger("container")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    stop = asyncio.Event()
    started = threading.Event()

    async def lifespan() -> None:
        async with app.router.lifespan_context(app):
            started.set()
            await stop.wait()

    running = asyncio.run_coroutine_threadsafe(lifespan(), loop)
    try:
        while not started.wait(0.05):
            if running.done():
                running.result()  # the start-up's exception
        with httpx.Client(transport=_OnLoop(app, loop), base_url="http://app") as client:
            yield App(client, log)
    finally:
        loop.call_soon_threadsafe(stop.set)
        concurrent.futures.wait([running], timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        logger.removeHandler(log)
        logger.setLevel(level)
    running.result()  # its shutdown's exception


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


def start_server(
    base: Path, log: Path, env: Mapping[str, str] | None = None, *, fork: bool = True
) -> Server:
    """`serve` on a free port, its output in `log`: forked from the worker's forkserver
    (tests/forkserver.py), or with `fork=False` a process of its own, as `python serve`."""
    port = free_port()
    environment = {
        **os.environ,
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        **(env or {}),
    }
    if fork:
        return Server(
            forkserver.FORKSERVER.start([str(SERVE)], environment, Path.cwd(), log, log), port, log
        )
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
def app(trained: OptMl) -> Iterator[App]:
    """One app with default settings in this process, shared by the tests that only send
    requests."""
    with in_process(serve_settings(trained)) as running:
        running.wait_until(200)
        yield running


@pytest.fixture(scope="session")
def server(trained: OptMl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `serve` process, for clients that need a URL (tests/launch): the quick settings, as
    those clients' subject is what they send and print."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    running = start_server(trained.base, log, QUICK_ENV)
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
