"""A decoder process: client image bytes in, the model's crop out, within a memory budget.

The server runs a few of these (`container.serving.decoders`) so that an image no header check
caught (a decoder walking a pathological file for seconds, a conversion bigger than promised)
costs one replaceable process, never the server. It imports neither torch nor the server: only
Pillow, NumPy and `container.decoding`. Its address space is capped at what it used after start-up
plus its budget, so an allocation past the budget fails here, not in the server.

Pixels travel through a buffer both processes map (a memfd): an image's bytes one way, its crop
(and the image kept for an explanation) back. Messages are small JSON frames on two pipes
(`multiprocessing.connection`), one each way per image in the common case. Nothing is unpickled
on either side: what a worker sends back may come from a decoder that a hostile file took over,
so the parent only ever reads JSON and pixel buffers of the sizes it expects.

    parent -> worker: {"config": ...}                       once, first
    worker -> parent: {"ready": true}                       once started
    parent -> worker: {"name", "shape" | null, "keep_image", "size", "unasked_pixels", "prep"}
                                                            per image, its bytes in the buffer
                                                            (prep: the model's preprocessing; on
                                                            a multi-model endpoint models differ)
    worker -> parent: {"header": [width, height]}           for an image over unasked_pixels:
    parent -> worker: {"go": bool}                          the request's budget decides
    worker -> parent: {"crop": shape, "image": shape | null} | {"error": ...}
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from PIL import Image

from container.decoding import (
    DecodeLimits,
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessing,
    eval_crop,
    load_rgb,
    open_image,
)

__all__ = ["WorkerConfig", "crop", "main"]

_KEPT_SIDE = 512  # an image kept for an explanation is only drawn under its heat map


@dataclass(frozen=True)
class WorkerConfig:
    """What every job of one worker shares."""

    limits: DecodeLimits
    memory_bytes: int
    max_input_bytes: int  # the shared buffer an image's bytes are handed over in

    def to_json(self) -> dict[str, Any]:
        return {
            "limits": vars(self.limits),
            "memory_bytes": self.memory_bytes,
            "max_input_bytes": self.max_input_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerConfig:
        return cls(
            DecodeLimits(**data["limits"]),
            int(data["memory_bytes"]),
            int(data["max_input_bytes"]),
        )


def crop(
    image: Image.Image, prep: Preprocessing, keep_image: bool
) -> tuple[np.ndarray, Image.Image | None]:
    """The model's (S, S, 3) uint8 crop, and the image scaled for an overlay when asked."""
    pixels = np.asarray(eval_crop(image, prep), dtype=np.uint8)
    if not keep_image:
        return pixels, None
    kept = image.copy()
    kept.thumbnail((_KEPT_SIDE, _KEPT_SIDE))
    return pixels, kept


def _error(kind: str, message: str, detail: str = "", limit: str = "") -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message, "detail": detail, "limit": limit}}


def _job(
    inbox: Connection,
    outbox: Connection,
    shared: mmap.mmap,
    config: WorkerConfig,
    job: dict[str, Any],
    data: bytes,
) -> dict[str, Any] | None:
    """Decode and crop one image; the answer to send (its pixels left in `shared`), or None
    when the request's budget refused it."""
    prep = Preprocessing.from_json(job["prep"])
    if job["shape"] is not None:
        image = Image.fromarray(np.frombuffer(data, np.uint8).reshape(job["shape"]), "RGB")
    else:
        opened, header = open_image(data, config.limits, min_side=prep.resize_size)
        if header.pixels > job["unasked_pixels"]:  # the request's budget decides
            outbox.send_bytes(json.dumps({"header": [header.width, header.height]}).encode())
            if not json.loads(inbox.recv_bytes())["go"]:
                return None
        image = load_rgb(opened)
    pixels, kept = crop(image, prep, job["keep_image"])
    arrays = [pixels] if kept is None else [pixels, np.asarray(kept, dtype=np.uint8)]
    position = 0
    for array in arrays:
        shared[position : position + array.nbytes] = np.ascontiguousarray(array).data.cast("B")
        position += array.nbytes
    return {"crop": pixels.shape, "image": None if kept is None else arrays[1].shape}


def _cap_memory(budget: int) -> None:
    """Allow this process its current address space plus `budget` bytes, no more."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(read_fd: int, write_fd: int, shared_fd: int) -> int:
    """Serve jobs until the parent closes the pipe; exit after a MemoryError (heap suspect)."""
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    shared = mmap.mmap(shared_fd, os.fstat(shared_fd).st_size)
    config = WorkerConfig.from_json(json.loads(inbox.recv_bytes())["config"])
    _cap_memory(config.memory_bytes)
    outbox.send_bytes(b'{"ready": true}')
    while True:
        try:
            job = json.loads(inbox.recv_bytes())
        except EOFError:
            return 0
        data = shared[: job["size"]]  # a copy: the answer's pixels go where it was
        try:
            answer = _job(inbox, outbox, shared, config, job, data)
        except ImageTooLargeError as exc:
            answer = _error("too_large", str(exc), exc.detail, exc.limit)
        except ImageDecodeError as exc:
            answer = _error("decode", str(exc), exc.detail)
        except MemoryError:
            outbox.send_bytes(json.dumps(_error("memory", "", "MemoryError")).encode())
            return 3
        except Exception as exc:  # a decoder bug or a crafted file: the image is unusable
            answer = _error("decode", "", f"{type(exc).__name__}: {exc}")
        if answer is not None:
            outbox.send_bytes(json.dumps(answer).encode())


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:4])))
