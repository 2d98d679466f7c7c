"""Tensors from decoded images: augmentation crops, uint8 HWC tensors and batch normalisation.

Decoding lives in `container.decoding` (no torch, so decoder processes stay small); this module
takes its RGB images on. Normalisation happens on a whole batch, on the model's device: a stack of
HWC images is already an NCHW channels-last batch, so no per-image float copies are made and
DataLoader workers ship 4x fewer bytes through shared memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from container.decoding import REDUCING_GAP, RESAMPLE, Preprocessing

__all__ = ["normalize", "random_resized_box", "random_resized_crop", "to_uint8_hwc"]


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
    return image.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


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
