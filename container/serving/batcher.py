"""Dynamic batching: concurrent requests' images share forward passes.

One public entry point, `submit`, puts an (item, future) pair on a queue; one worker task takes
what is queued (up to `max_batch_size`), runs it on the model's executor, and resolves each future.
The model's thread is the only place forward passes run, so while it computes one batch the next
one gathers by itself: under load batches fill up, and an idle server answers a lone request at
once. `max_delay_s` adds an optional wait for stragglers, timed with a monotonic clock. A batch
that raises is retried one item at a time, so only the items that fail get the error.
`health()` says when the batcher cannot answer now: its task has died, the running batch or the
oldest queued item is older than a threshold, or every recent batch has failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchResult", "Batcher"]

logger = logging.getLogger(__name__)

_FAILING = 3  # consecutive failed batches after which `health()` reports the batcher failing

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class BatchResult(Generic[Out]):
    """An item's result, and where its time went (for the request log)."""

    value: Out
    queue_s: float
    model_s: float
    batch_size: int


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[BatchResult[Out]]
    enqueued: float


class Batcher(Generic[In, Out]):
    """Runs `run_batch(items) -> outputs` (same length and order) on batches of submitted items."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        executor: Executor,
        max_batch_size: int,
        max_delay_s: float = 0.0,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue()
        self._waiting: deque[_Pending[In, Out]] = deque()  # the queue's items, in its order
        self._running: list[_Pending[In, Out]] = []
        self._running_since: float | None = None
        self._worker: asyncio.Task[None] | None = None
        self._failures = 0  # batches that raised since the last one that did not
        self._last_error = ""

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    async def stop(self) -> None:
        """Stop the worker; whatever is still running or queued fails with RuntimeError."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        left = self._running + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for pending in left:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, item: In) -> BatchResult[Out]:
        """The item's output once its batch has run; its own exception if it failed."""
        future: asyncio.Future[BatchResult[Out]] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, time.monotonic())
        self._waiting.append(pending)
        self._queue.put_nowait(pending)
        return await future

    def health(self, stall_s: float, *, failing_counts: bool = True) -> str | None:
        """None when a submitted item would be computed now; else why not (with
        `failing_counts` false, a run of failed batches is not a reason: on a multi-model
        endpoint one broken model must not fail the others' health check)."""
        if self._worker is None or self._worker.done():
            return "the batcher has stopped"
        now = time.monotonic()
        if self._running_since is not None and now - self._running_since > stall_s:
            return f"a batch has been running for {now - self._running_since:.0f} s"
        waiting = [p.enqueued for p in self._waiting if not p.future.done()]
        if waiting and now - min(waiting) > stall_s:
            return f"the oldest queued image has waited {now - min(waiting):.0f} s"
        if failing_counts and self._failures >= _FAILING:
            return f"the last {self._failures} batches failed ({self._last_error})"
        return None

    def _taken(self, pending: _Pending[In, Out]) -> _Pending[In, Out]:
        self._waiting.popleft()  # FIFO: the item just taken is the oldest one
        return pending

    async def _gather(self) -> list[_Pending[In, Out]]:
        batch = [self._taken(await self._queue.get())]
        deadline = time.monotonic() + self._max_delay_s
        while len(batch) < self._max_batch_size:
            if not self._queue.empty():
                batch.append(self._taken(self._queue.get_nowait()))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._taken(await asyncio.wait_for(self._queue.get(), remaining)))
            except TimeoutError:
                break
        # A client that went away cancelled its future: do not compute for it.
        return [p for p in batch if not p.future.cancelled()]

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = await self._gather()
            if self._running:
                await self._run(loop, self._running)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[In, Out]]) -> None:
        started = self._running_since = time.monotonic()
        try:
            outputs = await loop.run_in_executor(
                self._executor, self._run_batch, [p.item for p in batch]
            )
            if len(outputs) != len(batch):
                raise RuntimeError(f"{len(outputs)} outputs for a batch of {len(batch)}")
        except Exception as exc:
            self._running_since = None
            self._failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"[:200]
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            logger.warning(
                "A batch of %d failed (%s); running its items one by one", len(batch), exc
            )
            for pending in batch:
                await self._run(loop, [pending])
            return
        self._running_since = None
        self._failures = 0
        model_s = time.monotonic() - started
        for pending, output in zip(batch, outputs, strict=True):
            if not pending.future.done():
                pending.future.set_result(
                    BatchResult(output, started - pending.enqueued, model_s, len(batch))
                )
