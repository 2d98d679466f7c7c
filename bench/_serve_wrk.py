"""Load on a server: wrk POSTing JPEGs over N keep-alive connections, on a quiet host only.

wrk (one thread, closed loop: each connection sends its next request when the last one is
answered) runs `_serve_wrk.lua`, which cycles through the photos of one size and prints a JSON
line with the request count, duration, latency percentiles, and every non-200 answer and socket
error; any of those fails the run. Before each measurement the host must be quiet: the
benchmark's own server is idle then, so a 2-thread matmul that gets fewer than `QUIET_CORES`
cores means something else is running, and the measurement waits for it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._runs import host_cores

__all__ = [
    "QUIET_CORES",
    "LoadError",
    "LoadResult",
    "measure",
    "wait_until_quiet",
    "warm_up",
    "wrk_version",
]

logger = logging.getLogger(__name__)

QUIET_CORES = 1.5
"""`host_cores()` at least this: the host's second core is free for the server under test."""
_QUIET_WAIT_S = 180  # then measure anyway; the result records the host as busy
_QUIET_RETRY_S = 5
_SCRIPT = Path(__file__).with_name("_serve_wrk.lua")
_MARKER = "WRK_RESULT "
_TIMEOUT = "60s"  # wrk's default of 2 s would drop slow answers from the latencies


class LoadError(RuntimeError):
    """Raised when wrk fails, or a server answers anything but 200 or drops a connection."""


@dataclass(frozen=True)
class LoadResult:
    """One measurement: `connections` clients for `seconds`, and the host just before it."""

    connections: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    host_cores: float  # `host_cores()` just before, with the server idle
    load_1min: float  # the host's 1-minute load average just before

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def quiet(self) -> bool:
        return self.host_cores >= QUIET_CORES


def wrk_version() -> str:
    """wrk's first line of `--version` (it prints it with the usage, and exits 1)."""
    done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip()


def wait_until_quiet() -> float:
    """`host_cores()` once it reaches QUIET_CORES, or its last value after `_QUIET_WAIT_S`."""
    deadline = time.monotonic() + _QUIET_WAIT_S
    while True:
        cores = host_cores()
        if cores >= QUIET_CORES or time.monotonic() > deadline:
            return cores
        logger.info(
            "Host busy (a 2-thread matmul gets %.2f cores, load %.2f); waiting",
            cores,
            os.getloadavg()[0],
        )
        time.sleep(_QUIET_RETRY_S)


def _wrk(url: str, photos: Sequence[Path], connections: int, seconds: float) -> dict[str, int]:
    command = [
        "wrk", "--threads", "1", "--connections", str(connections),
        "--duration", f"{seconds:g}s", "--timeout", _TIMEOUT, "--script", str(_SCRIPT),
        url, "--", *map(str, photos),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARKER)]
    if done.returncode != 0 or not lines:
        raise LoadError(f"wrk exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    result: dict[str, int] = json.loads(lines[0].removeprefix(_MARKER))
    return result


def _check(url: str, connections: int, result: dict[str, int], *, some: bool = True) -> None:
    """LoadError for any failed request, or (with `some`) for no answer at all."""
    failures = {
        k: result[k]
        for k in ("not_ok", "connect_errors", "read_errors", "write_errors", "timeouts")
        if result[k]
    }
    if failures or (some and not result["requests"]):
        raise LoadError(
            f"{url} with {connections} connections: {result['requests']} requests answered, "
            f"failures {failures or 'none'} (not_ok = answers other than 200)"
        )


def warm_up(url: str, photos: Sequence[Path], connections: int, seconds: float) -> None:
    """Load `url` as `measure` does, keeping no numbers; a slow server may answer none yet.

    It waits for a quiet host first, so that a server still working off the requests of a
    previous load has finished them.
    """
    wait_until_quiet()
    _check(url, connections, _wrk(url, photos, connections, seconds), some=False)


def measure(url: str, photos: Sequence[Path], connections: int, seconds: float) -> LoadResult:
    """Load `url` with `connections` clients for `seconds`; LoadError on any failed request."""
    cores = wait_until_quiet()
    load = os.getloadavg()[0]
    result = _wrk(url, photos, connections, seconds)
    _check(url, connections, result)
    return LoadResult(
        connections=connections,
        requests=result["requests"],
        seconds=result["duration_us"] / 1e6,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        host_cores=cores,
        load_1min=load,
    )
