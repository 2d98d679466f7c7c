"""The profiler's clocks and the running totals it keeps with them, read lazily.

On the CPU work runs when Python calls it, so the host's `perf_counter` around a phase is the
phase's time. On a GPU the host only queues work; timing a phase with the host's clock means
waiting for the GPU at both ends of it (torch.cuda.synchronize), which keeps the host from queueing
the next step while the GPU works and leaves the GPU idle between steps. Instead `CudaClock`
records an event into the GPU's queue at each end of a phase, and the time between two events (on
the device's own timeline) is read once the device has reached them: `Timeline` keeps the marks
pending and adds them up when its totals are asked for (one wait for the last mark), or, without
waiting, when many are pending and the device has already passed them.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

import torch

__all__ = ["Clock", "CudaClock", "HostClock", "Timeline", "clock_for"]

M = TypeVar("M")

PENDING_LIMIT = 1024
"""Intervals kept unread before the ones the device has already passed are added up (about 250
training steps: a dog-breed epoch of batches of 32 is 209)."""


class Clock(Protocol[M]):
    """Marks points in the work's order and tells the seconds between two of them."""

    def mark(self) -> M:
        """A point after everything issued so far."""
        ...

    def reached(self, mark: M) -> bool:
        """Whether the work before `mark` is done, so that it can be read without waiting."""
        ...

    def wait(self, mark: M) -> None:
        """Block until the work before `mark` is done."""
        ...

    def seconds(self, start: M, end: M) -> float:
        """The time between two reached marks."""
        ...


class HostClock:
    """`perf_counter`: on the CPU the host's time is the work's time, and every mark is read."""

    def mark(self) -> float:
        return time.perf_counter()

    def reached(self, mark: float) -> bool:
        return True

    def wait(self, mark: float) -> None:
        return None

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaClock:
    """CUDA events on the device's current stream: the device's timeline, with no wait to mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        return event

    def reached(self, mark: torch.cuda.Event) -> bool:
        return bool(mark.query())  # type: ignore[no-untyped-call]

    def wait(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return float(start.elapsed_time(end)) / 1000.0  # elapsed_time is in milliseconds


def clock_for(device: torch.device) -> Clock[Any]:
    """Events on a GPU, the host's clock on the CPU."""
    return CudaClock(device) if device.type == "cuda" else HostClock()


class Timeline(Generic[M]):
    """Seconds per phase and per training step, from marks read when they can be.

    A phase is the time between a mark at its start and one at its end; a step is the time between
    the ends of two steps (the first from `start_steps`), so a step also holds what lies between
    its phases. `seconds` and `steps` hold what has been read; `settle` reads the rest.
    """

    def __init__(self, clock: Clock[M], pending_limit: int = PENDING_LIMIT) -> None:
        self.clock = clock
        self.pending_limit = pending_limit
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.steps: list[float] = []
        # (phase name, or None for a step; start; end), in the order their ends were marked.
        self._pending: deque[tuple[str | None, M, M]] = deque()
        self._step_start: M | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.clock.mark()
        try:
            yield
        finally:
            self._add(name, start, self.clock.mark())

    def start_steps(self) -> None:
        """The loop is about to wait for the first batch of its steps."""
        self._step_start = self.clock.mark()

    def end_step(self) -> None:
        """A training step ended: its time runs from the end of the step before."""
        end = self.clock.mark()
        if self._step_start is not None:
            self._add(None, self._step_start, end)
        self._step_start = end

    def settle(self) -> None:
        """Read every pending mark: one wait, for the last one marked (the others come before)."""
        if self._pending:
            self.clock.wait(self._pending[-1][2])
        self._read(everything=True)

    def take(self) -> tuple[dict[str, float], list[float]]:
        """Every phase's seconds and step's time so far, read to the end; then start afresh."""
        self.settle()
        seconds, steps = dict(self.seconds), self.steps
        self.seconds, self.steps = defaultdict(float), []
        return seconds, steps

    def _add(self, name: str | None, start: M, end: M) -> None:
        self._pending.append((name, start, end))
        if len(self._pending) > self.pending_limit:
            self._read(everything=False)  # only what the device has passed

    def _read(self, *, everything: bool) -> None:
        while self._pending:
            name, start, end = self._pending[0]
            if not (everything or self.clock.reached(end)):
                return  # marks are reached in order: none after this one is either
            self._pending.popleft()
            seconds = self.clock.seconds(start, end)
            if name is None:
                self.steps.append(round(seconds, 5))
            else:
                self.seconds[name] += seconds
