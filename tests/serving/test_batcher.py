"""The dynamic batcher, driven by real asyncio tasks and a real executor thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from container.serving.batcher import Batcher


class Model:
    """Doubles numbers, remembers batch sizes, refuses negative numbers, can be made slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.gate.wait()
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if any(i < 0 for i in items):
            raise ValueError(f"negative input among {list(items)}")
        return [2 * i for i in items]


Scenario = Callable[[Model, Batcher[int, int]], Awaitable[None]]


def _run(scenario: Scenario, max_batch_size: int, delay_s: float = 0.0) -> None:
    """Run `scenario` with a new Model behind a started batcher, stopped afterwards."""

    async def main() -> None:
        model = Model()
        batcher = Batcher(model, ThreadPoolExecutor(1), max_batch_size, delay_s)
        batcher.start()
        try:
            await scenario(model, batcher)
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_a_lone_request_runs_at_once() -> None:
    async def scenario(model: Model, batcher: Batcher[int, int]) -> None:
        result = await batcher.submit(21)
        assert (result.value, result.batch_size) == (42, 1)

    _run(scenario, max_batch_size=8)


def test_requests_waiting_for_a_busy_model_share_the_next_pass() -> None:
    async def scenario(model: Model, batcher: Batcher[int, int]) -> None:
        model.gate.clear()  # the model is busy...
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 10)]
        await asyncio.sleep(0.05)
        model.gate.set()  # ...and frees up
        results = await asyncio.gather(first, *rest)
        assert [r.value for r in results] == [2 * i for i in range(10)]  # each its own answer
        assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]  # at most 4 a pass
        assert all(r.queue_s >= 0 and r.model_s >= 0 for r in results)

    _run(scenario, max_batch_size=4)


def test_max_delay_lets_a_batch_fill() -> None:
    async def scenario(model: Model, batcher: Batcher[int, int]) -> None:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.submit(2))
        await asyncio.gather(first, second)
        assert model.batches == [[1, 2]]

    _run(scenario, max_batch_size=8, delay_s=0.2)


def test_a_failing_item_fails_alone() -> None:
    async def scenario(model: Model, batcher: Batcher[int, int]) -> None:
        model.gate.clear()
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in (1, -1, 3)]
        await asyncio.sleep(0.05)
        model.gate.set()
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert outcomes[0].value == 2  # type: ignore[union-attr]
        assert isinstance(outcomes[1], ValueError)
        assert outcomes[2].value == 6  # type: ignore[union-attr]

    _run(scenario, max_batch_size=8)


def test_a_wrong_number_of_outputs_is_an_error_not_a_mix_up() -> None:
    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(lambda items: [0], ThreadPoolExecutor(1), 8)
        batcher.start()
        outcomes = await asyncio.gather(
            batcher.submit(1), batcher.submit(2), return_exceptions=True
        )
        # Run one by one after the batch failed, each gets its single output.
        assert [getattr(o, "value", o) for o in outcomes] == [0, 0]
        await batcher.stop()

    asyncio.run(scenario())


def test_cancelled_requests_are_not_computed() -> None:
    async def scenario(model: Model, batcher: Batcher[int, int]) -> None:
        model.gate.clear()
        busy = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.gate.set()
        await asyncio.gather(busy, kept)
        assert model.batches == [[1], [3]]

    _run(scenario, max_batch_size=8)


def test_stop_fails_what_is_still_queued() -> None:
    async def scenario() -> None:
        model = Model(delay_s=0.3)
        executor = ThreadPoolExecutor(1)
        batcher: Batcher[int, int] = Batcher(model, executor, max_batch_size=1)
        batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        await batcher.stop()
        executor.shutdown(wait=True)  # as the server does: the running pass finishes
        for future in futures:  # the running one and the queued ones
            with pytest.raises(RuntimeError, match="shutting down"):
                await future

    asyncio.run(scenario())


def test_health_reports_a_stalled_batch_and_a_stalled_queue() -> None:
    async def scenario(model: Model, batcher: Batcher[int, int]) -> None:
        assert batcher.health(stall_s=0.1) is None
        model.gate.clear()  # the model hangs on the first item; the second waits in the queue
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.3)
        reason = batcher.health(stall_s=0.1)
        assert reason is not None
        assert "a batch has been running for" in reason
        model.gate.set()
        await asyncio.gather(*futures)
        assert batcher.health(stall_s=0.1) is None

    _run(scenario, max_batch_size=1)


def test_health_reports_every_recent_batch_failing_until_one_succeeds() -> None:
    async def scenario(model: Model, batcher: Batcher[int, int]) -> None:
        for _ in range(3):
            with pytest.raises(ValueError, match="negative"):
                await batcher.submit(-1)
        reason = batcher.health(stall_s=60)
        assert reason is not None
        assert "the last 3 batches failed (ValueError: negative input" in reason
        assert (await batcher.submit(1)).value == 2
        assert batcher.health(stall_s=60) is None

    _run(scenario, max_batch_size=1)


def test_health_reports_a_batcher_that_has_stopped() -> None:
    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(Model(), ThreadPoolExecutor(1), max_batch_size=1)
        batcher.start()
        await batcher.stop()
        assert batcher.health(stall_s=60) == "the batcher has stopped"

    asyncio.run(scenario())
