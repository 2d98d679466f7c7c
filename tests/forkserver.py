"""`train` and `serve` without their seconds of imports: a process that imports what they import
once, then forks a child per run, which executes the script as `python SCRIPT` would.

The child has the run's command line, environment, working folder, stdin (/dev/null), stdout
and stderr (files), and ends as that process would: the script's `sys.exit`, an uncaught
exception's traceback and exit status 1, a signal. torch, torchvision and the rest take about
4 s of CPU to import on a 2-core AMD EPYC (5 s for `serve`, with FastAPI and uvicorn), a third of
a small test job. The imports run no torch operation, so the children start with no thread pool to
inherit. tests/serving/test_lifecycle.py runs one `serve` as a process of its own, and the
training tests that signal or wrap `train` run theirs so, which proves the two alike.

`python -m tests.forkserver` imports MODULES, then serves over its stdin and stdout,
a JSON line each way: {"argv", "env", "cwd", "stdout", "stderr"} (file paths; one path twice is one
file, as `stderr=subprocess.STDOUT`) asks for a child; {"started": PID} answers, in the order
asked; {"exited": PID, "returncode": N} says that one ended (-N: killed by signal N, as subprocess
says). When its stdin closes it kills the children still running and exits. `Forkserver` is the
tests' side, `Child` the handle of one run.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]

# What `train` imports before and while it trains (the reports' matplotlib, the int8 network's
# torch.ao), and what `serve` imports (uvicorn's event loop and protocol modules when it starts),
# so that no child imports it again.
MODULES = (
    "container.training.__main__",
    "container.training.job",
    "container.training.reports",
    "container.training.quantization",
    "container.training.rules_report",
    "container.training.debugger",
    "container.serving.__main__",
    "uvicorn.lifespan.on",
    "uvicorn.loops.uvloop",
    "uvicorn.protocols.websockets.auto",
)


def _serve() -> dict[str, Any]:
    """Fork a child per request and say when each ends; in a child, its request."""
    wakeup, wake = os.pipe()  # SIGCHLD writes a byte to `wake`, which select() sees in `wakeup`
    for fd in (wakeup, wake):
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake)
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0, wakeup], [], [])
        if wakeup in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wakeup, 4096):
                    pass
            _reap(children)
        if 0 not in readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:  # the test worker is gone
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            raise SystemExit(0)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wakeup)
                os.close(wake)
                request: dict[str, Any] = json.loads(line)
                return request
            children.add(pid)
            _answer(started=pid)


def _reap(children: set[int]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.remove(pid)
            _answer(exited=pid, returncode=os.waitstatus_to_exitcode(status))


def _answer(**message: int) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _become(request: Mapping[str, Any]) -> None:
    """This child takes the run's stdio, folder, environment and command line."""
    stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    same = request["stderr"] == request["stdout"]
    stderr = (
        stdout if same else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    )
    stdin = os.open(os.devnull, os.O_RDONLY)
    for opened, fd in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(opened, fd)
    for opened in {stdin, stdout, stderr}:
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])


class Child:
    """One forked run: what the tests use of `subprocess.Popen` (pid, args, returncode, poll,
    wait, send_signal, kill)."""

    def __init__(self, args: list[str], pid: int) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        if self.returncode is None:
            raise RuntimeError(f"the forkserver of {self.args[0]} exited; {self.pid}'s end is lost")
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _end(self, returncode: int | None) -> None:
        self.returncode = returncode
        self._ended.set()


class Forkserver:
    """The test worker's side: started on first use (so that it keeps to the CPUs the worker was
    given, see tests/conftest.py); a thread reads its answers."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._reader = threading.Thread()
        self._lock = threading.Lock()
        self._asked: collections.deque[list[str]] = collections.deque()
        self._started: collections.deque[Child] = collections.deque()
        self._news = threading.Condition()

    def start(
        self, argv: list[str], env: Mapping[str, str], cwd: Path, stdout: Path, stderr: Path
    ) -> Child:
        """A child running `argv` (a Python script and its arguments), its output in the files."""
        request = {
            "argv": argv,
            "env": dict(env),
            "cwd": str(cwd),
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        with self._lock:
            server = self._server()
            assert server.stdin is not None
            with self._news:
                self._asked.append(argv)
            server.stdin.write(json.dumps(request).encode() + b"\n")
            with self._news:
                if not self._news.wait_for(lambda: self._started or server.poll() is not None, 60):
                    raise RuntimeError(f"the forkserver started no {argv[0]} within 60 s")
                if not self._started:
                    raise RuntimeError(f"the forkserver exited ({server.returncode})")
                return self._started.popleft()

    def run(
        self, argv: list[str], env: Mapping[str, str], cwd: Path, timeout: float
    ) -> tuple[int, str, str]:
        """Run `argv` to its end; its exit status, stdout and stderr. subprocess.TimeoutExpired,
        with the child killed, after `timeout` seconds."""
        with tempfile.TemporaryDirectory(prefix="forkserver-") as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            child = self.start(argv, env, cwd, out, err)
            try:
                returncode = child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise subprocess.TimeoutExpired(
                    argv, timeout, out.read_text(), err.read_text()
                ) from None
            return returncode, out.read_text(), err.read_text()

    def close(self) -> None:
        """Close its stdin, on which it exits, reap it and let its reader end."""
        with self._lock:
            if self._process is not None:
                assert self._process.stdin is not None
                assert self._process.stdout is not None
                self._process.stdin.close()
                self._process.wait(timeout=30)
                self._reader.join(timeout=30)
                self._process.stdout.close()
                self._process = None

    def _server(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.forkserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            assert self._process.stdout is not None
            self._reader = threading.Thread(
                target=self._read, args=(self._process.stdout,), daemon=True
            )
            self._reader.start()
        return self._process

    def _read(self, answers: IO[bytes]) -> None:
        """Hand each started child to its `start` and end each child that exits."""
        running: dict[int, Child] = {}
        for line in answers:
            message: dict[str, int] = json.loads(line)
            with self._news:
                if "started" in message:
                    child = Child(self._asked.popleft(), message["started"])
                    running[child.pid] = child
                    self._started.append(child)
                    self._news.notify_all()
                else:
                    running.pop(message["exited"])._end(message["returncode"])
        with self._news:
            for child in running.values():
                child._end(None)
            self._news.notify_all()


FORKSERVER = Forkserver()
"""The test worker's one forkserver."""


if __name__ == "__main__":
    for module in MODULES:
        __import__(module)
    _become(_serve())
    runpy.run_path(sys.argv[0], run_name="__main__")
