"""Tensors from decoded images: augmentation crops and batch normalisation."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms

from container.decoding import Preprocessing
from container.images import normalize, random_resized_box, random_resized_crop, to_uint8_hwc
from tests.crafted import gradient_photo


def test_random_resized_crop_draws_only_from_its_generator() -> None:
    image = gradient_photo(300, 200)
    first = np.asarray(random_resized_crop(image, 64, torch.Generator().manual_seed(5)))
    torch.manual_seed(1)  # the global generator plays no part
    second = np.asarray(random_resized_crop(image, 64, torch.Generator().manual_seed(5)))
    third = np.asarray(random_resized_crop(image, 64, torch.Generator().manual_seed(6)))
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, third)


def test_random_resized_box_follows_torchvision_s_distribution() -> None:
    """Crop areas spread over (0.08, 1) of the image, aspect ratios over (3/4, 4/3)."""
    generator = torch.Generator().manual_seed(0)
    boxes = [random_resized_box(400, 300, generator) for _ in range(500)]
    areas = [(r - left) * (b - t) / (400 * 300) for left, t, r, b in boxes]
    aspects = [(r - left) / (b - t) for left, t, r, b in boxes]
    assert 0.07 <= min(areas) < 0.15
    assert 0.85 < max(areas) <= 1.0
    assert 0.4 < float(np.mean(areas)) < 0.6
    assert min(aspects) > 0.7
    assert max(aspects) < 1.4
    assert all(0 <= left < r <= 400 and 0 <= t < b <= 300 for left, t, r, b in boxes)


def test_normalize_is_torchvision_normalize_in_channels_last() -> None:
    prep = Preprocessing.for_image_size(32)
    images = [gradient_photo(32, 32, seed=s) for s in range(3)]
    batch = torch.stack([to_uint8_hwc(image) for image in images])
    ours = normalize(batch, prep, torch.device("cpu"))
    reference = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(prep.mean, prep.std)]
    )
    theirs = torch.stack([reference(image) for image in images])
    assert ours.shape == (3, 3, 32, 32)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert normalize(batch, prep, torch.device("cpu"), channels_last=False).is_contiguous()
