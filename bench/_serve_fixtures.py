"""What every server in the serving benchmark gets: one model artifact and the same photos.

The model is a randomly initialised ResNet-18 with a 133-class head (the dog dataset's size),
seeded, saved once in our artifact format; the naive server and TorchServe load its `model.pt`
state_dict. The photos are generated (no downloads here) to cost what camera JPEGs cost: smooth
gradients, overlapping shapes, fine texture and sensor noise, saved as baseline JPEG at quality
90 with 4:2:0 chroma, so the decoder has real entropy-coded detail to work through.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from container.decoding import Preprocessing
from container.model import CLASSES_FILE, WEIGHTS_FILE, build, save_artifact

__all__ = ["ARCH", "NUM_CLASSES", "ImageSet", "make_artifact", "make_photos"]

ARCH = "resnet18"
NUM_CLASSES = 133
"""The dog dataset's 133 breeds."""
_JPEG_QUALITY = 90
_TEXTURE = ((8, 18.0), (3, 11.0))  # (coarseness in px, amplitude): fur, foliage, fabric
_SENSOR_NOISE = 3.0


@dataclass(frozen=True)
class ImageSet:
    """A few JPEGs of one nominal size, cycled by the load generator."""

    width: int
    height: int
    files: tuple[Path, ...]

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def mean_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files) // len(self.files)


def make_artifact(model_dir: Path, seed: int) -> Path:
    """Save a seeded ResNet-18 (133 classes) as our artifact; returns its state_dict file."""
    torch.manual_seed(seed)
    model = build(ARCH, NUM_CLASSES)
    classes = [f"breed {i:03d}" for i in range(NUM_CLASSES)]
    save_artifact(
        model_dir,
        model.state_dict(),
        arch=ARCH,
        classes=classes,
        preprocessing=Preprocessing.for_image_size(224),
        extra_meta={},
    )
    assert (model_dir / CLASSES_FILE).is_file()
    return model_dir / WEIGHTS_FILE


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A two-colour linear gradient with a few low-frequency waves across it (sky, walls)."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * x + np.sin(angle) * y
    t = (t - t.min()) / (t.max() - t.min())
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels: np.ndarray = start * (1 - t[..., None]) + end * t[..., None]
    for _ in range(3):
        fx, fy = rng.uniform(1, 12, 2)
        wave = np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
        pixels += rng.uniform(5, 20) * wave[..., None] * rng.uniform(0.5, 1, 3)
    return pixels


def _draw_shapes(image: Image.Image, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(image)
    width, height = image.size
    side = min(width, height)
    for _ in range(int(rng.integers(8, 16))):
        colour = (int(rng.integers(256)), int(rng.integers(256)), int(rng.integers(256)))
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * side
        box = (cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            corners = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(5)]
            draw.polygon(corners, fill=colour)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    background = Image.fromarray(
        np.clip(_background(width, height, rng), 0, 255).astype(np.uint8), "RGB"
    )
    _draw_shapes(background, rng)
    # Soft edges, as a lens gives; then texture and noise, which are what make a JPEG expensive.
    blurred = background.filter(ImageFilter.GaussianBlur(min(width, height) / 600))
    pixels = np.asarray(blurred, dtype=np.float32)
    for coarseness, amplitude in _TEXTURE:
        small = rng.normal(0, 1, (max(1, height // coarseness), max(1, width // coarseness)))
        texture = Image.fromarray(small.astype(np.float32), "F").resize(
            (width, height), Image.Resampling.BICUBIC
        )
        pixels += amplitude * np.asarray(texture)[..., None]
    pixels += rng.normal(0, _SENSOR_NOISE, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Baseline (not progressive), 4:2:0: what phone and camera JPEGs mostly are.
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY, subsampling="4:2:0", progressive=False)
    return buffer.getvalue()


def make_photos(
    folder: Path, sizes: Sequence[tuple[int, int]], per_size: int, seed: int
) -> list[ImageSet]:
    """`per_size` different JPEGs of each (width, height), written under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = []
    for width, height in sizes:
        files = []
        for n in range(per_size):
            path = folder / f"photo_{width}x{height}_{n}.jpg"
            path.write_bytes(_jpeg(_photo(width, height, seed * 1000 + n)))
            files.append(path)
        sets.append(ImageSet(width, height, tuple(files)))
    return sets
