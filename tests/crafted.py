"""Images the tests make themselves: photo-like pixels, files whose headers lie, and the zeros
of an archive bomb."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image


def gradient_photo(width: int, height: int, seed: int = 0, noise_level: float = 20) -> Image.Image:
    """A horizontal gradient under sensor-like noise: compresses and resizes like a photo."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, noise_level, (height, width, 3))
    pixels = np.clip(gradient + noise + [0, 40, 80], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, IHDR (8-bit RGB) and IEND, with correct CRCs, and no image data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


class Zeros:
    """`size` zero bytes, made as they are read: a bomb's content without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)
