"""How much memory the server may use and how much it holds: what a multi-model endpoint's
memory budget is measured with.

The container's limit is its cgroup's (v2 `memory.max`, v1 `memory.limit_in_bytes`), else the
host's memory. What the server holds is its resident set, read from /proc; after a model is
dropped, `release` hands the freed heap back to the system so that the resident set shows it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from pathlib import Path

__all__ = ["container_limit_bytes", "release", "resident_bytes"]

_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def _host_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        line = next(line for line in meminfo if line.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


def container_limit_bytes() -> int:
    """The memory this container may use: its cgroup limit, or the host's memory if it has none
    (or a larger one)."""
    host = _host_bytes()
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _UNLIMITED:
            return min(int(text), host)
    return host


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "malloc_trim"):  # glibc; musl has none and returns memory by itself
        libc.malloc_trim(0)


def release() -> None:
    """Collect what is unreachable and give the heap's free pages back to the system."""
    gc.collect()
    _malloc_trim()
