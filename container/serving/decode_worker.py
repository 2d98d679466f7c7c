"""A decoder process: client image bytes in, the model's crop out, within a memory budget.

The server runs a few of these (`container.serving.decoders`) so that an image no header check
caught (a decoder walking a pathological file for seconds, a conversion bigger than promised)
costs one replaceable process, never the server. It imports neither torch nor the server: only
Pillow, NumPy and `container.decoding`. Its address space is capped at what it used after start-up
plus its budget, so an allocation past the budget fails here, not in the server.

Messages are length-prefixed frames on two pipes (`multiprocessing.connection`): a JSON header,
then raw bytes. Nothing is unpickled on either side: the bytes a worker sends back may come from a
decoder that a hostile file took over, so the parent only ever reads pixel buffers and JSON.

    parent -> worker: {"config": ...}                              once, first
    worker -> parent: {"ready": true}                              once started
    parent -> worker: {"name", "shape" | null, "keep_image"}, data  per image
    worker -> parent: {"header": [width, height]}                  encoded images, before decoding
    parent -> worker: {"go": bool}                                 the request's budget allows it
    worker -> parent: {"crop": shape, "image": shape | null}, crop[, image] | {"error": ...}
"""

from __future__ import annotations

import json
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

    prep: Preprocessing
    limits: DecodeLimits
    memory_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "prep": self.prep.to_json(),
            "limits": vars(self.limits),
            "memory_bytes": self.memory_bytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerConfig:
        return cls(
            Preprocessing.from_json(data["prep"]),
            DecodeLimits(**data["limits"]),
            int(data["memory_bytes"]),
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


def _send(conn: Connection, header: dict[str, Any], *buffers: np.ndarray) -> None:
    conn.send_bytes(json.dumps(header).encode())
    for buffer in buffers:
        conn.send_bytes(np.ascontiguousarray(buffer).data.cast("B"))


def _error(kind: str, message: str, detail: str = "", limit: str = "") -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message, "detail": detail, "limit": limit}}


def _job(
    inbox: Connection, outbox: Connection, config: WorkerConfig, job: dict[str, Any], data: bytes
) -> None:
    if job["shape"] is not None:
        image = Image.fromarray(np.frombuffer(data, np.uint8).reshape(job["shape"]), "RGB")
    else:
        opened, header = open_image(data, config.limits, min_side=config.prep.resize_size)
        outbox.send_bytes(json.dumps({"header": [header.width, header.height]}).encode())
        if not json.loads(inbox.recv_bytes())["go"]:
            return
        image = load_rgb(opened)
    pixels, kept = crop(image, config.prep, job["keep_image"])
    if kept is None:
        _send(outbox, {"crop": pixels.shape, "image": None}, pixels)
    else:
        array = np.asarray(kept, dtype=np.uint8)
        _send(outbox, {"crop": pixels.shape, "image": array.shape}, pixels, array)


def _cap_memory(budget: int) -> None:
    """Allow this process its current address space plus `budget` bytes, no more."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(read_fd: int, write_fd: int) -> int:
    """Serve jobs until the parent closes the pipe; exit after a MemoryError (heap suspect)."""
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    config = WorkerConfig.from_json(json.loads(inbox.recv_bytes())["config"])
    _cap_memory(config.memory_bytes)
    outbox.send_bytes(b'{"ready": true}')
    while True:
        try:
            job = json.loads(inbox.recv_bytes())
            data = inbox.recv_bytes()
        except EOFError:
            return 0
        try:
            _job(inbox, outbox, config, job, data)
        except ImageTooLargeError as exc:
            outbox.send_bytes(
                json.dumps(_error("too_large", str(exc), exc.detail, exc.limit)).encode()
            )
        except ImageDecodeError as exc:
            outbox.send_bytes(json.dumps(_error("decode", str(exc), exc.detail)).encode())
        except MemoryError:
            outbox.send_bytes(json.dumps(_error("memory", "", "MemoryError")).encode())
            return 3
        except Exception as exc:  # a decoder bug or a crafted file: the image is unusable
            detail = f"{type(exc).__name__}: {exc}"
            outbox.send_bytes(json.dumps(_error("decode", "", detail)).encode())


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
