"""`train` without its seconds of imports: a process that imports what `train` imports once, then
forks one child per run, which executes the `train` script as `python train` would.

The child has the run's command line, environment, working folder, stdin (/dev/null), stdout
and stderr (files), and ends as that process would: the script's `sys.exit`, an uncaught
exception's traceback and exit status 1, a signal. torch, torchvision, matplotlib and the rest
take about 4 s of CPU to import on a 2-core AMD EPYC, a third of a small test job. The imports
run no torch operation, so the children start with no thread pool to inherit.

`python -m tests.forkserver` serves one run at a time over its stdin and stdout, a JSON line
each way: {"argv", "env", "cwd", "stdout", "stderr"} (the last two are file paths) asks for a
run; {"pid": N} says it started, {"returncode": N} that it ended (-N: killed by signal N, as
subprocess says). It exits when its stdin closes. `Forkserver` is the tests' side.
"""

from __future__ import annotations

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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What `train` imports before and while it trains (the reports' matplotlib, the int8 network's
# torch.ao), so that no child imports it again.
PRELOAD = (
    "container.training.__main__",
    "container.training.job",
    "container.training.reports",
    "container.training.quantization",
    "container.training.rules_report",
    "container.training.debugger",
)


def _serve() -> dict[str, Any]:
    """Fork a child per request, answer its pid and exit status; in a child, its request."""
    for line in sys.stdin:
        request: dict[str, Any] = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        _answer(pid=pid)
        _, status = os.waitpid(pid, 0)
        _answer(returncode=os.waitstatus_to_exitcode(status))
    raise SystemExit(0)  # the test worker is gone


def _answer(**message: int) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _become(request: Mapping[str, Any]) -> None:
    """This child takes the run's stdio, folder, environment and command line."""
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])


class Forkserver:
    """The test worker's side: started on first use (so that it keeps to the CPUs the worker was
    given, see tests/conftest.py), one run at a time."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _server(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.forkserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,  # no read-ahead, so that select() sees every answer not yet read
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self._process

    def run(
        self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float
    ) -> tuple[int, str, str]:
        """Run `argv` (a Python script and its arguments) in a child; its exit status, stdout and
        stderr. subprocess.TimeoutExpired, with the child killed, after `timeout` seconds."""
        with self._lock, tempfile.TemporaryDirectory(prefix="forkserver-") as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            server = self._server()
            assert server.stdin is not None
            request = {
                "argv": argv,
                "env": env,
                "cwd": str(cwd),
                "stdout": str(out),
                "stderr": str(err),
            }
            server.stdin.write(json.dumps(request).encode() + b"\n")
            pid = self._read(server)["pid"]
            ready, _, _ = select.select([server.stdout], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                self._read(server)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            returncode = self._read(server)["returncode"]
            return returncode, out.read_text(), err.read_text()

    def close(self) -> None:
        """Close its stdin, on which it exits, and reap it."""
        with self._lock:
            if self._process is not None:
                self._process.communicate(timeout=30)
                self._process = None

    @staticmethod
    def _read(server: subprocess.Popen[bytes]) -> dict[str, int]:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"the forkserver exited ({server.wait()})")
        answer: dict[str, int] = json.loads(line)
        return answer


if __name__ == "__main__":
    for module in PRELOAD:
        __import__(module)
    _become(_serve())
    runpy.run_path(sys.argv[0], run_name="__main__")
