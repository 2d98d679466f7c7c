"""Batches for training and evaluation: deterministic order, exact mid-epoch resume, safe workers.

Every DataLoader is iterated on a background thread. Besides overlapping loading with compute, this
keeps torch's SIGCHLD handler (installed only when a loader runs on the main thread) out of the
process: that handler raises a dead worker's error wherever the main thread happens to be, even
halfway through an optimiser step. On a background thread the loader notices the dead worker
itself and the error reaches the loop between steps, where the epoch can go on without workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from container.training.distributed import Rank

__all__ = ["Batch", "LoaderSettings", "eval_batches", "steps_per_epoch", "train_batches"]

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
_PREFETCH = 2
_END = object()


@dataclass(frozen=True)
class LoaderSettings:
    """How this process loads: batch size, workers, and its share of the data."""

    batch_size: int
    workers: int
    pin_memory: bool
    seed: int
    rank: Rank


def _drop_last(size: int, settings: LoaderSettings) -> bool:
    # A last batch of one image breaks BatchNorm in training mode; drop it rather than crash.
    per_rank = math.ceil(size / settings.rank.world_size)
    return per_rank % settings.batch_size == 1


def steps_per_epoch(size: int, settings: LoaderSettings) -> int:
    """Optimiser steps per epoch for a training set of `size` items."""
    per_rank = math.ceil(size / settings.rank.world_size)
    if _drop_last(size, settings):
        return per_rank // settings.batch_size
    return math.ceil(per_rank / settings.batch_size)


def _in_background(make: Callable[[], Iterable[Batch]]) -> Iterator[Batch]:
    """Iterate `make()` on a thread, a couple of batches ahead; its errors re-raise here."""
    items: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH)
    closing = threading.Event()

    def fill() -> None:
        try:
            for item in make():
                while not closing.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if closing.is_set():
                    return
            items.put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            items.put(exc)

    thread = threading.Thread(target=fill, name="loader", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closing.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                items.get(timeout=0.1)  # unblock a pending put
        thread.join()


def _loader(
    dataset: Dataset[Any], settings: LoaderSettings, workers: int, **kw: Any
) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=workers,
        pin_memory=settings.pin_memory,
        **kw,
    )


def train_batches(
    dataset: Dataset[Any], settings: LoaderSettings, epoch: int, start_step: int
) -> Iterator[Batch]:
    """The epoch's batches from `start_step` on, in the order a fresh epoch would have them.

    The order depends only on (seed, epoch), so a resumed epoch skips exactly the steps already
    done. If a loader worker dies (a full /dev/shm, the OOM killer) the epoch goes on without
    workers from the step it had reached.
    """
    size = len(dataset)  # type: ignore[arg-type]
    rank = settings.rank
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=rank.world_size, rank=rank.rank, shuffle=True, seed=settings.seed
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    workers, done = settings.workers, start_step

    def make() -> DataLoader[Any]:
        return _loader(
            Subset(dataset, order[done * settings.batch_size :]),
            settings,
            workers,
            drop_last=_drop_last(size, settings),
            generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch),
        )

    while True:
        try:
            for batch in _in_background(make):
                yield batch
                done += 1
            return
        except (RuntimeError, EOFError, ConnectionError) as exc:
            if workers == 0 or not _worker_died(exc):
                raise
            logger.warning(
                "A loader worker died (%s: %s); continuing this epoch without loader workers",
                type(exc).__name__,
                exc,
            )
            workers = 0


def _worker_died(exc: BaseException) -> bool:
    # torch reports a dead worker as a RuntimeError, unless it died while handing a batch over
    # through a shared file descriptor: then the hand-over's socket breaks (EOF, reset).
    return not isinstance(exc, RuntimeError) or "DataLoader worker" in str(exc)


def eval_batches(dataset: Dataset[Any], settings: LoaderSettings) -> Iterator[Batch]:
    """This process's share of a set: every world_size-th item, no padding, so metrics are exact."""
    rank = settings.rank
    shard = Subset(dataset, range(rank.rank, len(dataset), rank.world_size))  # type: ignore[arg-type]
    return _in_background(lambda: _loader(shard, settings, settings.workers))
