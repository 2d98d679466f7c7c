"""The servers under test as processes: start one, wait until it classifies a photo, stop it.

Each server runs in a session of its own, so that whatever it spawns (uvicorn, TorchServe's Java
frontend and its Python workers) can be ended with it even when the benchmark fails midway. A
server counts as ready once a POST of a real photo answers 200 with JSON: our server and
TorchServe open their sockets before the model is loaded and answer 503 until then.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from bench._runs import REPO
from container.sagemaker_env import BASE_DIR_ENV, OptMl

__all__ = [
    "Endpoint",
    "ServerError",
    "free_ports",
    "naive",
    "ours",
    "running",
    "wait_until_serving",
]

logger = logging.getLogger(__name__)

_READY_TIMEOUT_S = 180
_STOP_TIMEOUT_S = 30
_LOG_TAIL = 3000
_RETRY_S = 0.5
_SHOWN = 300  # characters of the first answer that go to the log
_OUR_VARIABLES = ("SAGEMAKER_", "SERVE_")  # our server's settings: none may leak in from here
_OUR_READY = re.compile(r"Ready in [\d.]+ s: (.+)$", re.MULTILINE)
_OUR_FORM = re.compile(r"\b(fp32|bf16|fp16|int8) on \w+")  # in the Ready line: "... int8 on cpu"
_OUR_AUTO = re.compile(r"SERVE_PRECISION=auto: (measured .+; serving (\w+))$", re.MULTILINE)


@dataclass(frozen=True)
class Endpoint:
    """A server that answers: where to POST photos, and what it says about its own setup."""

    url: str
    about: str
    measured: str | None = None
    """Ours with SERVE_PRECISION=auto: what it timed at warm-up ("measured ms per image ...")."""
    precision: str | None = None
    """Ours: the precision it serves (with SERVE_PRECISION=auto, the one it chose)."""


class ServerError(RuntimeError):
    """Raised when a server cannot start or never answers a photo with 200; has its log's end."""


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL:]


def _end(process: subprocess.Popen[bytes], stop: Callable[[], None] | None) -> None:
    """Ask the server to stop (`stop`, else SIGTERM), then SIGKILL its session if it lingers."""
    if process.poll() is None:
        if stop is not None:
            stop()
        else:
            process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(_STOP_TIMEOUT_S)
    # The session's group holds what the server spawned; gone already unless something hung.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def running(
    command: list[str],
    *,
    log: Path,
    cwd: Path,
    env: Mapping[str, str],
    stop: Callable[[], None] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` running in its own session, output to `log`; ended on leaving, come what may."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        _end(process, stop)


def wait_until_serving(url: str, photo: bytes, process: subprocess.Popen[bytes], log: Path) -> None:
    """POST `photo` to `url` until it answers 200 with JSON (logged: what the model said)."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    last = "no answer"
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(
                    f"{process.args!r} exited with {process.returncode}; end of {log}:\n"
                    f"{_tail(log)}"
                )
            try:
                response = client.post(url, content=photo, headers={"Content-Type": "image/jpeg"})
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    answer = json.dumps(response.json(), separators=(",", ":"))  # JSON or raise
                    logger.info("%s answers: %s", url, answer[:_SHOWN])
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            time.sleep(_RETRY_S)
    raise ServerError(
        f"{url} did not answer a photo with 200 in {_READY_TIMEOUT_S} s (last: {last}); "
        f"end of {log}:\n{_tail(log)}"
    )


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_OUR_VARIABLES)}


@contextmanager
def ours(
    opt_ml: OptMl, work: Path, photo: bytes, precision: str | None = None
) -> Iterator[Endpoint]:
    """`python -m container.serving` on `opt_ml` (model/ holds the artifact): default settings,
    but for SERVE_PRECISION when `precision` is given."""
    (port,) = free_ports(1)
    env = {
        **_clean_environment(),
        BASE_DIR_ENV: str(opt_ml.base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        **({"SERVE_PRECISION": precision} if precision else {}),
    }
    log = work / "ours.log"
    command = [sys.executable, "-m", "container.serving"]
    with running(command, log=log, cwd=REPO, env=env) as process:
        url = f"http://127.0.0.1:{port}/invocations"
        wait_until_serving(url, photo, process, log)
        text = log.read_text(encoding="utf-8", errors="replace")
        ready, auto = _OUR_READY.search(text), _OUR_AUTO.search(text)
        about = ready.group(1) if ready else "no 'Ready' line in its log"
        form = _OUR_FORM.search(about)
        yield Endpoint(
            url,
            about,
            auto.group(1) if auto else None,
            auto.group(2) if auto else form.group(1) if form else None,
        )


@contextmanager
def naive(model_dir: Path, work: Path, photo: bytes) -> Iterator[Endpoint]:
    """`bench.naive_server` on the artifact folder `model_dir`."""
    (port,) = free_ports(1)
    log = work / "naive.log"
    command = [sys.executable, "-m", "bench.naive_server", str(model_dir), "--port", str(port)]
    with running(command, log=log, cwd=REPO, env=_clean_environment()) as process:
        url = f"http://127.0.0.1:{port}/invocations"
        wait_until_serving(url, photo, process, log)
        # It keeps torch's default thread count, which is this process's too.
        yield Endpoint(url, f"{torch.get_num_threads()} torch threads")
