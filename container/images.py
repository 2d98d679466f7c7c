"""Bytes to tensors: the one preprocessing path shared by training, evaluation and serving.

Images are decoded with Pillow (JPEGs at reduced DCT scale when the target is much smaller), cropped
and resized in one resampling step, and handed on as uint8 HWC tensors. Normalisation happens on a
whole batch, on the model's device: a stack of HWC images is already an NCHW channels-last batch, so
no per-image float copies are made and DataLoader workers ship 4x fewer bytes through shared memory.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDecodeError",
    "ImageTooLargeError",
    "Preprocessing",
    "decode",
    "eval_box",
    "eval_crop",
    "normalize",
    "random_resized_box",
    "random_resized_crop",
    "to_uint8_hwc",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = Image.Resampling.BILINEAR
# Pillow first shrinks by an integer factor with a box filter while the image is more than this
# many times the target; at 3 the result is indistinguishable from a full resample and much faster.
_REDUCING_GAP = 3.0
_WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded into an image (corrupt, truncated, not an image)."""


class ImageTooLargeError(ImageDecodeError):
    """Raised, before decoding, for an image with more pixels than allowed (decompression bomb)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model's inputs are made; stored in the model artifact so `serve` does the same."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    version: int = 1

    @classmethod
    def for_image_size(cls, image_size: int) -> Preprocessing:
        """The usual 0.875 centre-crop ratio: 224 -> resize 256, crop 224."""
        return cls(image_size=image_size, resize_size=round(image_size / 0.875))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(data["image_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            version=int(data["version"]),
        )


def decode(
    source: bytes | Path, *, min_side: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode an image file to an RGB Pillow image, upright per its EXIF orientation.

    With `min_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both
    sides >= min_side: a 6 MP photo for a 256 px target decodes ~3x faster. With `max_pixels`, an
    image that would still decode to more pixels is refused from its header alone, before any
    memory is spent on it. Transparent images are composited on white (what a viewer shows), not
    stripped to whatever colour hides under alpha.
    """
    try:
        # Reading the bytes first means no file handle outlives a failed decode.
        data = source if isinstance(source, bytes) else source.read_bytes()
        opened = Image.open(io.BytesIO(data))
        if min_side is not None and opened.format == "JPEG":
            opened.draft("RGB", (min_side, min_side))
        width, height = opened.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"the image decodes to {width}x{height} pixels ({width * height / 1e6:.0f} MP), "
                f"more than the {max_pixels / 1e6:.0f} MP allowed; send a smaller image"
            )
        opened.load()
        return _to_rgb(ImageOps.exif_transpose(opened))
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, checked when it opens
        raise ImageTooLargeError(f"{exc}; send a smaller image") from exc
    # Pillow signals corrupt input with many exception types (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...); at this boundary every one of them means "not a usable image".
    except Exception as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image  # convert() would copy it for nothing
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        array = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    return image.convert("RGB")


def eval_box(size: tuple[int, int], prep: Preprocessing) -> tuple[float, float, float, float]:
    """The square of the source image that evaluation sees: `resize_size` short side, centred
    `image_size` crop, in source pixels (left, top, right, bottom)."""
    width, height = size
    side = prep.image_size * min(width, height) / prep.resize_size
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def eval_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side to `resize_size` and centre-crop `image_size`, in one resample."""
    size = (prep.image_size, prep.image_size)
    return image.resize(size, _RESAMPLE, box=eval_box(image.size, prep), reducing_gap=_REDUCING_GAP)


def random_resized_box(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom), drawn from `generator`.

    torchvision draws from torch's global generator, so what a sample gets depends on which loader
    worker (or thread) loads it; an explicit generator makes augmentation a function of the sample.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_low + (log_high - log_low) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1))
            return left, top, left + w, top + h
    # As torchvision: the largest centred crop within the allowed aspect ratios.
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop(image: Image.Image, size: int, generator: torch.Generator) -> Image.Image:
    """A random crop (see `random_resized_box`) resized to size x size in one resampling step."""
    box = random_resized_box(*image.size, generator)
    return image.resize((size, size), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP)


def to_uint8_hwc(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (H, W, 3) uint8 tensor, one copy."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def normalize(
    batch: torch.Tensor,
    prep: Preprocessing,
    device: torch.device,
    channels_last: bool = True,
) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised float32 (N, 3, H, W) on `device`.

    The permute makes a channels-last view without copying; `channels_last=False` makes it
    contiguous NCHW for code that wants the default layout.
    """
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.tensor(prep.mean, device=device).mul_(255).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).mul_(255).view(1, 3, 1, 1)
    x = x.sub_(mean).div_(std)
    return x if channels_last else x.contiguous()
