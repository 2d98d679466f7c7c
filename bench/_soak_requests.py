"""What the soak test sends: every kind of request, the statuses it may get, and its bodies.

`KINDS` is the one table of expectations: adjust it there as the server changes. The bodies are
built once, before the load, from the serving benchmark's photos and the server's default limits:
valid requests, requests over a limit (each just over, or with a header that claims far more than
it holds), and hostile ones that a careless parser turns into a 500 or a long stall.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from bench._serve_fixtures import ImageSet
from container.invocations import CUSTOM_ATTRIBUTES
from container.serving.budget import RequestBudget
from container.serving.settings import MiB, ServeSettings

__all__ = ["KINDS", "Kind", "Request", "build_requests", "describe"]

_HUGE_SIDE = 50_000
_HUGE_NPY_SHAPE = (100_000, 100_000, 3)
_NESTING = 100_000
_INT_DIGITS = 5000
_REQUEST_ID_CHARS = 1024
_EXTRA_SCANS = 1000
_GARBAGE_BYTES = 20_000
_GARBAGE_SEED = 7

Group = Literal["valid", "oversized", "hostile"]


@dataclass(frozen=True)
class Kind:
    """A kind of request: what the server must answer (besides a 503 overloaded) and how often."""

    name: str
    group: Group
    expected: frozenset[int]
    weight: int


def _kind(name: str, group: Group, expected: set[int], weight: int = 1) -> Kind:
    return Kind(name, group, frozenset(expected), weight)


KINDS = (
    _kind("JPEG 500x375", "valid", {200}, 6),
    _kind("JPEG 1024x768", "valid", {200}, 6),
    _kind("JPEG 3000x2000", "valid", {200}, 2),
    _kind("JSON list of 4 base64 JPEGs", "valid", {200}, 3),
    _kind(".npy batch of 4", "valid", {200}, 3),
    _kind("body over SAGEMAKER_MAX_PAYLOAD_IN_MB", "oversized", {413}),
    _kind("JSON list over SERVE_MAX_IMAGES", "oversized", {413}),
    _kind(f"PNG whose header says {_HUGE_SIDE}x{_HUGE_SIDE}", "oversized", {413}),
    _kind(".npy whose header says a huge shape", "oversized", {400, 413}),
    _kind(f"JSON nested {_NESTING} deep", "hostile", {400, 413}),
    _kind(f"JSON {_INT_DIGITS}-digit integer", "hostile", {400, 413}),
    _kind("garbage bytes as image/jpeg", "hostile", {400}),
    _kind("truncated JPEG", "hostile", {400}),
    _kind("progressive JPEG over SERVE_MAX_JPEG_SCANS", "hostile", {413}),
    _kind("top_k of unicode digits", "hostile", {400}),
    _kind(f"request_id of {_REQUEST_ID_CHARS} characters", "hostile", {400}),
)
"""Every kind of request, the statuses it may get and its weight in the random mix."""


@dataclass(frozen=True)
class Request:
    """One body to POST to /invocations, with its Content-Type and custom attributes."""

    content_type: str
    body: bytes
    attributes: bytes | None = None  # X-Amzn-SageMaker-Custom-Attributes, raw bytes

    @property
    def headers(self) -> dict[bytes, bytes]:
        headers = {b"Content-Type": self.content_type.encode()}
        if self.attributes is not None:
            headers[CUSTOM_ATTRIBUTES.encode()] = self.attributes
        return headers


def _jpeg(image: Image.Image, *, progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width x height RGB, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes(1024))
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header for a uint8 array of `shape`, followed by 64 bytes only."""
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"  # the format pads the preamble to 64 bytes
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64)


def _many_scans(image: Image.Image, extra: int) -> bytes:
    """A progressive JPEG whose last scan repeats `extra` more times.

    Each repeat walks the whole image again, which is what a scan limit is for. Cutting at the
    last FF DA (start of scan) is safe: entropy-coded data stuffs every FF byte with a 00.
    """
    data = _jpeg(image, progressive=True)
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra + data[-2:]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def build_requests(photos: Sequence[ImageSet], limits: ServeSettings) -> list[list[Request]]:
    """The bodies of every kind in `KINDS`, in its order; a few variants of some."""
    by_size = {p.label: [f.read_bytes() for f in p.files] for p in photos}
    small = by_size["500x375"]
    first = Image.open(io.BytesIO(small[0])).convert("RGB")
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in small])
    garbage = np.random.default_rng(_GARBAGE_SEED).bytes(_GARBAGE_BYTES)

    def jpeg(body: bytes, attributes: bytes | None = None) -> Request:
        return Request("image/jpeg", body, attributes)

    def as_json(document: object) -> Request:
        return Request("application/json", json.dumps(document).encode())

    listed = [base64.b64encode(b).decode() for b in small]
    tiny = base64.b64encode(_jpeg(first.resize((32, 24)))).decode()
    # Latin-1 superscripts pass str.isdigit() but not int(); Arabic-Indic and fullwidth digits
    # sent as UTF-8 arrive as Latin-1 text, which is how HTTP header values are read.
    digits = [b"top_k=\xb2", b"top_k=\xb9\xb3", "top_k=\u0663".encode(), "top_k=\uff13".encode()]
    padding = bytes(limits.max_payload_bytes + MiB - len(small[0]))
    scans = limits.max_jpeg_scans + _EXTRA_SCANS
    requests = {
        **{f"JPEG {size}": [jpeg(b) for b in bodies] for size, bodies in by_size.items()},
        "JSON list of 4 base64 JPEGs": [as_json(listed)],
        ".npy batch of 4": [Request("application/x-npy", _npy(pixels))],
        "body over SAGEMAKER_MAX_PAYLOAD_IN_MB": [jpeg(small[0] + padding)],
        "JSON list over SERVE_MAX_IMAGES": [
            as_json([tiny] * (RequestBudget.from_settings(limits).max_images + 1))
        ],
        f"PNG whose header says {_HUGE_SIDE}x{_HUGE_SIDE}": [
            Request("image/png", _png_claiming(_HUGE_SIDE, _HUGE_SIDE))
        ],
        ".npy whose header says a huge shape": [
            Request("application/x-npy", _npy_claiming(_HUGE_NPY_SHAPE))
        ],
        f"JSON nested {_NESTING} deep": [
            Request("application/json", b"[" * _NESTING + b"]" * _NESTING)
        ],
        f"JSON {_INT_DIGITS}-digit integer": [
            Request("application/json", b"[" + b"7" * _INT_DIGITS + b"]")
        ],
        "garbage bytes as image/jpeg": [jpeg(garbage)],
        "truncated JPEG": [jpeg(b[: len(b) // 2]) for b in by_size["1024x768"]],
        "progressive JPEG over SERVE_MAX_JPEG_SCANS": [
            jpeg(_many_scans(first.resize((64, 48)), scans))
        ],
        "top_k of unicode digits": [jpeg(small[0], d) for d in digits],
        f"request_id of {_REQUEST_ID_CHARS} characters": [
            jpeg(small[0], b"request_id=" + b"r" * _REQUEST_ID_CHARS)
        ],
    }
    missing = {k.name for k in KINDS} ^ set(requests)
    assert not missing, f"KINDS and the bodies disagree on {missing}"
    return [requests[k.name] for k in KINDS]


def describe(photos: Sequence[ImageSet], limits: ServeSettings) -> str:
    """The requests, as Markdown list items for the Method part of the document."""
    weights = ", ".join(f"{k.name} {k.weight}" for k in KINDS)
    over_count = RequestBudget.from_settings(limits).max_images + 1
    return f"""- Valid requests: one photo-like JPEG per POST, {len(photos[0].files)} per size
  (`bench/_serve_fixtures.py`, the photos of `bench.serve_load`); a JSON list of the
  500x375 ones in base64; a .npy of their pixels, shape ({len(photos[0].files)}, 375, 500, 3).
- Over the limits: a body {limits.max_payload_mb:g} MiB + 1 MiB long; a JSON list of
  {over_count} small JPEGs; a PNG whose header says {_HUGE_SIDE}x{_HUGE_SIDE}; a
  .npy whose header says shape {_HUGE_NPY_SHAPE}, followed by 64 bytes.
- Hostile: `[` nested {_NESTING} deep; a {_INT_DIGITS}-digit integer in a JSON list;
  {_GARBAGE_BYTES // 1000} KB of random bytes as image/jpeg; the first half of each 1024x768
  JPEG; a 64x48 progressive JPEG whose last scan repeats {limits.max_jpeg_scans + _EXTRA_SCANS}
  more times; `top_k=` in superscript, Arabic-Indic or fullwidth digits in
  `{CUSTOM_ATTRIBUTES}`; a {_REQUEST_ID_CHARS}-character `request_id` there.
- Each connection picks its next request at random (seeded) by these weights: {weights}."""
