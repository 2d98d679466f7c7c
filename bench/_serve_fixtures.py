"""What every server in the serving benchmark gets: one model artifact and the same photos.

The model is a randomly initialised ResNet-18 with a 133-class head (the dog dataset's size),
seeded, saved once in our artifact format; the naive server and TorchServe load its `model.pt`
state_dict. It carries an int8 network as training writes one (`model_int8.pt`, and the gate's
numbers under `int8` in model_meta.json): calibrated with `container.int8.calibrate` on generated
photos preprocessed as the server does, then checked against fp32 on other generated photos with
training's own gate. An untrained network has no true labels, so fp32's top-1 stands in for them
(accuracy drop = 1 - agreement), and whatever the verdict the entry is marked usable: the
benchmark measures speed, and the accuracy evidence is the trained model's gate in the tests
(tests/training/test_quantization.py). The entry's `reason` says which case this is.

The photos are generated (no downloads here) to cost what camera JPEGs cost: smooth gradients,
overlapping shapes, fine texture and sensor noise, saved as baseline JPEG at quality 90 with 4:2:0
chroma, so the decoder has real entropy-coded detail to work through.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from container import int8
from container.abstention import Outputs, Policy
from container.decoding import Preprocessing, decode, eval_crop
from container.images import normalize, to_uint8_hwc
from container.model import (
    CLASSES_FILE,
    INT8_FILE,
    WithFeatures,
    build,
    save_artifact,
)
from container.training.hyperparameters import Hyperparameters
from container.training.quantization import gate

__all__ = ["ARCH", "NUM_CLASSES", "ImageSet", "make_artifact", "make_photos"]

ARCH = "resnet18"
NUM_CLASSES = 133
"""The dog dataset's 133 breeds."""
_JPEG_QUALITY = 90
_TEXTURE = ((8, 18.0), (3, 11.0))  # (coarseness in px, amplitude): fur, foliage, fabric
_SENSOR_NOISE = 3.0
_IMAGE_SIZE = 224
_INT8_PHOTO_SIZE = (500, 375)  # the benchmark's smallest photos
_INT8_PHOTO_SEED = 1_000_000  # far from the served photos' seeds: none of them is calibrated on
INT8_CALIBRATION_PHOTOS = 128
"""Photos the activation ranges are observed on (training: up to 256 of its images); with the
gate's, about 45 s on 2 cores, mostly making the photos and observing histograms."""
INT8_GATE_PHOTOS = 256
"""Other photos the int8 network is compared with fp32 on (training: up to 2048)."""
_BATCH = 32


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


def make_artifact(model_dir: Path, seed: int) -> dict[str, Any]:
    """Save a seeded ResNet-18 (133 classes) and its int8 network as our artifact; returns its
    model_meta.json content."""
    torch.manual_seed(seed)
    model = build(ARCH, NUM_CLASSES).eval()
    classes = [f"breed {i:03d}" for i in range(NUM_CLASSES)]
    prep = Preprocessing.for_image_size(_IMAGE_SIZE)
    quantized, entry = _int8(WithFeatures(model).eval(), prep)
    meta = save_artifact(
        model_dir,
        model.state_dict(),
        arch=ARCH,
        classes=classes,
        preprocessing=prep,
        extra_meta={int8.META_KEY: entry},
        int8_state=quantized,
    )
    assert (model_dir / CLASSES_FILE).is_file()
    assert (model_dir / INT8_FILE).is_file()
    return meta


def _crops(first: int, count: int, prep: Preprocessing) -> Iterator[torch.Tensor]:
    """Normalised float32 batches of generated photos `first` to `first + count`, each JPEG
    decoded, resized and cropped as the server's decoder workers do."""
    width, height = _INT8_PHOTO_SIZE
    for start in range(first, first + count, _BATCH):
        pixels = []
        for n in range(start, min(start + _BATCH, first + count)):
            data = _jpeg(_photo(width, height, _INT8_PHOTO_SEED + n))
            image = decode(data, min_side=prep.resize_size)
            pixels.append(to_uint8_hwc(eval_crop(image, prep)))
        yield normalize(torch.stack(pixels), prep, torch.device("cpu"))


def _outputs(network: Callable[[torch.Tensor], Any], batches: Iterable[torch.Tensor]) -> Outputs:
    """`network`'s logits and features on every image of `batches`, as float32."""
    answers = [network(x) for x in batches]
    return Outputs(
        torch.cat([logits.float() for logits, _ in answers]),
        torch.cat([features.float() for _, features in answers]),
    )


@torch.inference_mode()
def _int8(network: WithFeatures, prep: Preprocessing) -> tuple[dict[str, Any], dict[str, Any]]:
    """The int8 network's state_dict and its model_meta.json entry, shaped as training writes it
    (container/training/quantization.py `quantize`), with the gate's real numbers."""
    started = time.perf_counter()
    calibration = _crops(0, INT8_CALIBRATION_PHOTOS, prep)
    quantized = int8.calibrate(network, calibration, prep.image_size)
    batches = list(_crops(INT8_CALIBRATION_PHOTOS, INT8_GATE_PHOTOS, prep))
    fp32, answers = _outputs(network, batches), _outputs(quantized, batches)
    knobs = Hyperparameters.model_fields  # training's defaults for the gate's two limits
    verdict = gate(
        fp32,
        answers,
        fp32.logits.argmax(dim=1),  # an untrained network has no true labels: fp32's answers
        (Policy(), Policy()),  # the artifact sets no abstention threshold
        knobs["int8_min_agreement"].default,
        knobs["int8_max_accuracy_drop"].default,
    )
    passed = bool(verdict["passed"])
    reason = (
        f"the gate {'passed' if passed else 'FAILED'} on this untrained, random-weight benchmark "
        f"model ({verdict['reason']}; generated photos, fp32's top-1 as the labels)"
    )
    if not passed:
        reason += (
            "; marked usable all the same, because the serving benchmark measures speed only: "
            "the accuracy evidence is a trained model's gate"
        )
    entry = {
        "backend": int8.BACKEND,
        **verdict,
        "passed": True,  # what the server reads; `gate_passed` is the gate's own verdict
        "gate_passed": passed,
        "reason": reason,
        "calibration_images": INT8_CALIBRATION_PHOTOS,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return quantized.state_dict(), entry


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
