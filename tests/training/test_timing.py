"""The profiler's lazily read phase times: on a device-like clock whose marks are reached only when
the device gets there (as CUDA events are), on the host's clock, and the profiler's epochs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pytest
import torch

from container.training.profiler import PHASES, Profiler
from container.training.timing import HostClock, Timeline, clock_for


@dataclass
class QueueClock:
    """CUDA events without CUDA: a mark is a time on a device timeline the test advances (`run`),
    and it can be read only once the device has passed it; `wait` runs the device up to it."""

    now: float = 0.0  # how far the device has got
    queued: float = 0.0  # where the next mark falls: the end of the work queued so far
    waits: list[float] = field(default_factory=list)

    def queue(self, seconds: float) -> None:
        self.queued += seconds

    def run(self, seconds: float) -> None:
        self.now = min(self.queued, self.now + seconds)

    def mark(self) -> float:
        return self.queued

    def reached(self, mark: float) -> bool:
        return mark <= self.now

    def wait(self, mark: float) -> None:
        self.waits.append(mark)
        self.now = max(self.now, mark)

    def seconds(self, start: float, end: float) -> float:
        assert self.reached(end), "read before the device got there"
        return end - start


def _step(timeline: Timeline[float], clock: QueueClock, data: float, fb: float, opt: float) -> None:
    for name, seconds in (("data", data), ("forward_backward", fb), ("optimizer", opt)):
        with timeline.phase(name):
            clock.queue(seconds)
    timeline.end_step()


def test_phases_and_steps_are_read_at_the_end_with_one_wait() -> None:
    clock = QueueClock()
    timeline = Timeline(clock)
    timeline.start_steps()
    for _ in range(5):
        _step(timeline, clock, data=0.5, fb=2.0, opt=1.0)
    assert timeline.pending == 5 * 4  # nothing read: no mark has been reached
    assert timeline.seconds == {}
    assert timeline.steps == []

    seconds, steps = timeline.take()
    assert clock.waits == [17.5]  # one wait, for the last mark
    assert seconds == {"data": 2.5, "forward_backward": 10.0, "optimizer": 5.0}
    assert steps == [3.5] * 5
    assert sum(seconds.values()) == pytest.approx(sum(steps))  # the phases fill the steps
    assert timeline.pending == 0
    assert timeline.take() == ({}, [])  # the next epoch starts from nothing


def test_many_pending_marks_are_read_as_far_as_the_device_has_got_without_waiting() -> None:
    clock = QueueClock()
    timeline = Timeline(clock, pending_limit=8)
    timeline.start_steps()
    for _ in range(2):
        _step(timeline, clock, data=0.0, fb=1.0, opt=1.0)
    clock.run(3.0)  # the device is in step 2's optimizer phase
    # Step 3's data phase is the 9th pending interval, over the limit: what the device passed is
    # read.
    _step(timeline, clock, data=0.0, fb=1.0, opt=1.0)
    assert clock.waits == []
    assert timeline.steps == [2.0]  # step 1 is done; step 2 is not
    assert timeline.seconds == {"data": 0.0, "forward_backward": 2.0, "optimizer": 1.0}
    assert timeline.pending == 2 + 4  # step 2's optimizer and step; step 3's phases and step

    seconds, steps = timeline.take()
    assert seconds == {"data": 0.0, "forward_backward": 3.0, "optimizer": 3.0}
    assert steps == [2.0, 2.0, 2.0]
    assert clock.waits == [6.0]


def test_a_step_holds_what_lies_between_its_phases() -> None:
    """Work outside any phase (the loop's loss sums, the stop checks) counts in the step only."""
    clock = QueueClock()
    timeline = Timeline(clock)
    timeline.start_steps()
    _step(timeline, clock, data=1.0, fb=1.0, opt=1.0)
    clock.queue(0.25)  # after the step's phases, before its end
    timeline.end_step()  # a second step with no phases at all
    seconds, steps = timeline.take()
    assert sum(seconds.values()) == 3.0
    assert steps == [3.0, 0.25]


def test_the_host_clock_reads_every_mark_at_once() -> None:
    timeline = Timeline(HostClock(), pending_limit=2)
    timeline.start_steps()
    for _ in range(3):
        with timeline.phase("data"):
            pass
        timeline.end_step()
    assert timeline.pending == 0  # over the limit: all read, no wait needed
    assert len(timeline.steps) == 3


def test_the_clock_follows_the_device() -> None:
    assert isinstance(clock_for(torch.device("cpu")), HostClock)
    # The CUDA clock is chosen without touching CUDA (it records events only when marking).
    assert type(clock_for(torch.device("cuda", 0))).__name__ == "CudaClock"


def test_the_profiler_on_the_cpu_writes_the_same_epochs_as_before() -> None:
    """Phase seconds, per-step times and throughput from the host's clock; profile.json's shape."""
    profiler = Profiler(torch.device("cpu"))
    profiler.start_steps()
    for _ in range(3):
        for name in ("data", "forward_backward", "optimizer"):
            with profiler.phase(name):
                time.sleep(0.002)
        profiler.end_step()
    with profiler.phase("evaluation"):
        time.sleep(0.002)
    throughput = profiler.images_per_sec(24)
    epoch = profiler.end_epoch(1, train_images=24)

    assert list(epoch.seconds) == list(PHASES)
    assert epoch.seconds["checkpoint"] == 0.0
    assert all(epoch.seconds[name] >= 0.006 for name in ("data", "forward_backward", "optimizer"))
    assert len(epoch.step_s) == 3
    training = sum(epoch.seconds[name] for name in ("data", "forward_backward", "optimizer"))
    assert training <= sum(epoch.step_s) + 1e-3  # the steps hold their phases (and a little more)
    assert epoch.images_per_sec == pytest.approx(throughput, rel=0.01)  # rounded to 0.1 ms
    assert epoch.wall_s >= sum(epoch.step_s)

    written = json.loads(json.dumps(profiler.to_json()))
    assert set(written) == {
        "device",
        "initialization_s",
        "gpu_memory_total_mb",
        "epochs",
        "samples",
    }
    (row,) = written["epochs"]
    assert set(row) == {"epoch", "seconds", "train_images", "wall_s", "step_s", "images_per_sec"}

    second = profiler.end_epoch(2, train_images=0)  # nothing timed since: a fresh epoch
    assert second.step_s == []
    assert set(second.seconds.values()) == {0.0}
