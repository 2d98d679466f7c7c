"""The decoder pool: request images become model crops in worker processes that can be replaced.

Every image is decoded in one of a few `decode_worker` processes, driven from the event loop
(which reads their pipes; no thread sits in between). An image over the request's unasked share
sends its header first, to be charged to the request's pixel budget before a pixel is decoded;
the worker has `timeout_s` in all, and its address space is capped at `memory_bytes` more than
it needed at start-up. A worker over its time is killed and replaced, one that ran out of memory
or crashed likewise: the image is refused, the request gets its 4xx, and every other request goes
on with the other workers meanwhile. `health()` says when the pool cannot decode now (every
worker stuck or gone, or the oldest queued image older than `stall_s`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import mmap
import os
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

import container
from container.decoding import ImageDecodeError, ImageTooLargeError, Preprocessing
from container.serving.decode_worker import WorkerConfig
from container.serving.errors import OverloadedError

__all__ = ["Decoded", "DecoderPool", "DecoderTimeoutError"]

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = str(Path(container.__file__).resolve().parent.parent)
# One thread per worker: decoding an image is the parallelism; nested threads only contend.
# A fixed mmap threshold: glibc otherwise raises it after big frees, and a decoded 40 MP image
# would then stay in the heap; this way what a big image takes is given back when it is freed.
_WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": str(16 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
}
_START_TIMEOUT_S = 60
_MAX_MESSAGE = 1 << 16  # JSON only: pixels travel through the shared buffer
_UNDECODABLE = "the image could not be decoded; it may be corrupt"


class DecoderTimeoutError(ImageTooLargeError):
    """Raised for an image whose decoding took longer than the per-image time budget."""


@dataclass(frozen=True)
class Decoded:
    """One image's crop for the model, and the image itself (scaled down) when kept."""

    pixels: np.ndarray  # (S, S, 3) uint8
    image: Image.Image | None


class Admission(Protocol):
    """A request's pixel budget, as the decoders see it."""

    @property
    def unasked_pixels(self) -> int:
        """An image of at most this many pixels is decoded without asking `add`."""

    def add(self, name: str, width: int, height: int) -> None:
        """Charge an image's size from its header; raises to refuse it."""


@dataclass
class _Job:
    name: str
    data: bytes
    shape: tuple[int, ...] | None
    keep_image: bool
    admission: Admission
    prep: Preprocessing
    future: asyncio.Future[Decoded]
    enqueued: float


class _Worker:
    """One decoder process, its pipes (read on the event loop) and the buffer it shares."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        outbox: int,
        inbox: asyncio.StreamReader,
        transport: asyncio.BaseTransport,
        shared: mmap.mmap,
    ) -> None:
        self.process = process
        self._outbox = outbox
        self._inbox = inbox
        self._transport = transport
        self.shared = shared

    @classmethod
    async def start(cls, config: WorkerConfig) -> _Worker:
        """A started worker, ready for its first image; OSError if it cannot be."""
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Image bytes and crops travel through shared memory: through a pipe a 1.4 MB photo took
        # four copies and a dozen switches between the processes.
        shared_fd = os.memfd_create("decoder-buffer")
        os.ftruncate(shared_fd, config.max_input_bytes)
        shared = mmap.mmap(shared_fd, config.max_input_bytes)
        fds = (to_child_r, from_child_w, shared_fd)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "container.serving.decode_worker",
                *map(str, fds),
                pass_fds=fds,
                env={**os.environ, **_WORKER_ENV, "PYTHONPATH": _PACKAGE_ROOT},
                stdin=subprocess.DEVNULL,
            )
        finally:
            for fd in fds:
                os.close(fd)
        inbox = asyncio.StreamReader()
        pipe = os.fdopen(from_child_r, "rb", 0)
        try:
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(inbox), pipe
            )
        except BaseException:  # the server stops while it starts
            process.kill()
            await process.wait()
            pipe.close()
            os.close(to_child_w)
            shared.close()
            raise
        worker = cls(process, to_child_w, inbox, transport, shared)
        # Its imports take a moment: an image's time budget starts once it is ready.
        try:
            worker.write({"config": config.to_json()})
            async with asyncio.timeout(_START_TIMEOUT_S):
                ready = await worker.read()
        except (TimeoutError, EOFError, OSError, ValueError):
            ready = {}
        except asyncio.CancelledError:  # the server stops while it starts
            await worker.stop()
            raise
        if ready != {"ready": True}:
            await worker.stop()
            raise OSError(f"the decoder process did not start within {_START_TIMEOUT_S} s")
        return worker

    def write(self, message: dict[str, Any]) -> None:
        """Send a message (a few hundred bytes: the pipe always has room for it)."""
        payload = json.dumps(message).encode()
        os.write(self._outbox, struct.pack("!i", len(payload)) + payload)

    async def read(self) -> dict[str, Any]:
        """The next message (`multiprocessing.connection`'s framing); EOFError if it exited."""
        try:
            (size,) = struct.unpack("!i", await self._inbox.readexactly(4))
            if not 0 < size <= _MAX_MESSAGE:
                raise EOFError(f"a message of {size} bytes")
            message: dict[str, Any] = json.loads(await self._inbox.readexactly(size))
        except asyncio.IncompleteReadError as exc:
            raise EOFError("the decoder process exited") from exc
        return message

    def send(self, job: _Job) -> None:
        """Hand `job` to the process: its bytes in the shared buffer, the rest as a message."""
        if len(job.data) > len(self.shared):
            raise ImageDecodeError(
                f"{job.name} holds more bytes than a decoder takes; send a smaller image",
                f"{len(job.data)} bytes for a {len(self.shared)}-byte buffer",
            )
        self.shared[: len(job.data)] = job.data
        self.write(
            {
                "name": job.name,
                "shape": job.shape,
                "keep_image": job.keep_image,
                "size": len(job.data),
                "unasked_pixels": job.admission.unasked_pixels,
                "prep": job.prep.to_json(),
            }
        )

    def pixels(self, shapes: list[list[int] | None]) -> list[np.ndarray | None]:
        """Copies of the arrays of `shapes` the process left in the shared buffer, in order."""
        arrays: list[np.ndarray | None] = []
        position = 0
        for shape in shapes:
            if shape is None:
                arrays.append(None)
                continue
            size = math.prod(shape)
            if position + size > len(self.shared):
                raise ImageDecodeError(_UNDECODABLE, f"the decoder answered a shape of {shape}")
            array = np.frombuffer(self.shared, np.uint8, size, position).reshape(shape).copy()
            arrays.append(array)
            position += size
        return arrays

    def exited(self) -> bool:
        return self.process.returncode is not None

    async def stop(self) -> None:
        if not self.exited():
            self.process.kill()
        await self.process.wait()
        self._transport.close()
        os.close(self._outbox)
        self.shared.close()


class _Slot:
    """A worker and what it is doing; replaces its worker when the worker fails."""

    def __init__(self, number: int, config: WorkerConfig, timeout_s: float) -> None:
        self.number = number
        self.config = config
        self.timeout_s = timeout_s
        self.worker: _Worker | None = None
        self.busy_since: float | None = None
        self.failure: str | None = None  # why no worker could be started

    async def start(self) -> None:
        try:
            self.worker = await _Worker.start(self.config)
            self.failure = None
        except OSError as exc:
            self.worker = None
            self.failure = f"decoder process {self.number} cannot start: {exc}"
            logger.error("%s", self.failure)

    async def replace(self, why: str) -> None:
        logger.warning("Replacing decoder process %d: %s", self.number, why)
        await self.stop()
        await self.start()

    async def run(self, job: _Job) -> Decoded:
        """Decode one image in the worker; ImageDecodeError (or a ServingError from the request's
        budget) when it is refused."""
        self.busy_since = time.monotonic()
        try:
            if self.worker is not None and self.worker.exited():
                await self.replace(f"it had exited ({self.worker.process.returncode}) while idle")
            if self.worker is None:
                await self.start()
            if self.worker is None:
                raise OverloadedError(f"{self.failure}; retry shortly")
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self._exchange(self.worker, job)
            except TimeoutError:
                await self.replace(f"{job.name} took more than {self.timeout_s:g} s")
                raise DecoderTimeoutError(
                    f"{job.name} takes more than {self.timeout_s:g} s to decode; send a smaller "
                    "or simpler image (a baseline JPEG decodes fastest)",
                    "decode_timeout_s",
                ) from None
            except (EOFError, OSError) as exc:
                await self.replace(f"it failed on {job.name}: {exc}")
                raise ImageDecodeError(_UNDECODABLE, f"the decoder process failed: {exc}") from exc
        finally:
            self.busy_since = None

    async def _exchange(self, worker: _Worker, job: _Job) -> Decoded:
        worker.send(job)
        answer = await worker.read()
        if "header" in answer:
            width, height = answer["header"]
            try:
                job.admission.add(job.name, width, height)
            except Exception:
                worker.write({"go": False})
                raise
            worker.write({"go": True})
            answer = await worker.read()
        if "error" in answer:
            await self._raise(job, answer["error"])
        pixels, kept = worker.pixels([answer["crop"], answer["image"]])
        assert pixels is not None
        return Decoded(pixels, None if kept is None else Image.fromarray(kept, "RGB"))

    async def _raise(self, job: _Job, error: dict[str, str]) -> None:
        if error["kind"] == "too_large":
            raise ImageTooLargeError(error["message"], error["limit"])
        if error["kind"] == "memory":
            await self.replace(f"{job.name} ran it out of memory")
            raise ImageTooLargeError(
                f"{job.name} needs more memory to decode than a decoder has; send a smaller image",
                "max_decode_bytes",
            )
        raise ImageDecodeError(error["message"] or _UNDECODABLE, error["detail"])

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None


class DecoderPool:
    """`size` decoder processes; `decode` is called on the event loop."""

    def __init__(self, size: int, config: WorkerConfig, timeout_s: float) -> None:
        self._slots = [_Slot(n, config, timeout_s) for n in range(size)]
        self._timeout_s = timeout_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._waiting: deque[_Job] = deque()  # the queue's jobs, in the same (FIFO) order
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start the processes (in parallel) and the tasks that feed them."""
        loop = asyncio.get_running_loop()
        # A task group, not gather: cancelled (the server stops), it waits until every slot has
        # stopped what it started.
        async with asyncio.TaskGroup() as starting:
            for slot in self._slots:
                starting.create_task(slot.start())
        self._tasks = [
            loop.create_task(self._feed(slot), name=f"decoder-{slot.number}")
            for slot in self._slots
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        await asyncio.gather(*(slot.stop() for slot in self._slots))

    async def decode(
        self,
        name: str,
        data: bytes,
        shape: tuple[int, ...] | None,
        keep_image: bool,
        admission: Admission,
        prep: Preprocessing,
    ) -> Decoded:
        """Encoded bytes (shape None) or raw RGB pixels of `shape` -> the crop `prep` makes for
        its model.

        An encoded image over `admission.unasked_pixels` is charged to it from its header
        before it is decoded. A cancelled caller's image is skipped if it has not started.
        """
        future: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
        job = _Job(name, data, shape, keep_image, admission, prep, future, time.monotonic())
        self._waiting.append(job)
        self._queue.put_nowait(job)
        return await future

    async def _feed(self, slot: _Slot) -> None:
        while True:
            job = await self._queue.get()
            self._waiting.popleft()
            if job.future.done():  # its request was cancelled or timed out meanwhile
                continue
            try:
                decoded = await slot.run(job)
            except Exception as exc:
                if not job.future.done():
                    job.future.set_exception(exc)
            else:
                if not job.future.done():
                    job.future.set_result(decoded)

    def oldest_wait_s(self) -> float:
        """How long the oldest image still queued (not yet decoding) has waited."""
        waiting = [j.enqueued for j in self._waiting if not j.future.done()]
        return time.monotonic() - min(waiting) if waiting else 0.0

    def health(self, stall_s: float) -> str | None:
        """None when images can be decoded now; else why not."""
        if all(task.done() for task in self._tasks):
            return "the decoder pool has stopped"
        now = time.monotonic()
        grace = self._timeout_s + 5  # a stuck worker is killed at timeout_s; replacing takes a bit
        usable = [
            s
            for s in self._slots
            if s.failure is None and (s.busy_since is None or now - s.busy_since < grace)
        ]
        if not usable:
            failures = {s.failure for s in self._slots if s.failure}
            return "no decoder process can decode now" + (f": {failures.pop()}" if failures else "")
        if (waited := self.oldest_wait_s()) > stall_s:
            return f"the oldest image has waited {waited:.0f} s for a decoder"
        return None
