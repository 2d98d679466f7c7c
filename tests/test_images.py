"""The shared preprocessing path: decoding edge cases, crops, and normalisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from container.images import (
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessing,
    decode,
    eval_crop,
    normalize,
    random_resized_box,
    random_resized_crop,
    to_uint8_hwc,
)


def _encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0, noise_level: float = 20) -> Image.Image:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, noise_level, (height, width, 3))
    pixels = np.clip(gradient + noise + [0, 40, 80], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_target() -> None:
    data = _encode(_photo(3000, 2000))
    assert decode(data).size == (3000, 2000)
    reduced = decode(data, min_side=256)
    assert reduced.size == (750, 500)  # 1/4 scale: 1/8 would make the short side 250 < 256
    assert min(decode(data, min_side=224).size) >= 224


def test_small_jpeg_is_decoded_whole() -> None:
    assert decode(_encode(_photo(500, 375)), min_side=256).size == (500, 375)


def test_an_image_over_the_pixel_limit_is_refused_unless_it_decodes_smaller() -> None:
    png = _encode(Image.new("RGB", (2000, 1000)), "PNG")
    with pytest.raises(ImageTooLargeError, match="2000x1000 pixels"):
        decode(png, max_pixels=1_000_000)
    assert decode(png, max_pixels=2_000_000).size == (2000, 1000)
    # A JPEG's reduced-scale decode is what counts: 3000x2000 at 1/4 is 750x500.
    assert decode(_encode(_photo(3000, 2000)), min_side=256, max_pixels=1_000_000).size == (
        750,
        500,
    )


def test_exif_orientation_is_applied() -> None:
    image = _photo(400, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode(_encode(image, exif=exif.tobytes()))
    assert decoded.size == (200, 400)


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    decoded = decode(_encode(rgba, "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("1", "PNG")],
)
def test_every_mode_decodes_to_rgb(mode: str, fmt: str) -> None:
    image = _photo(64, 48).convert(mode)
    decoded = decode(_encode(image, fmt))
    assert (decoded.mode, decoded.size) == ("RGB", (64, 48))


def test_sixteen_bit_greyscale_keeps_its_range() -> None:
    array = np.full((8, 8), 40000, dtype=np.uint16)
    decoded = decode(_encode(Image.fromarray(array), "PNG"))
    assert decoded.getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8, not clipped to 255


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        _encode(_photo(64, 64))[:200],  # truncated JPEG
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # PNG signature, garbage after
    ],
)
def test_bad_bytes_raise_one_error_type(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode(data)


def test_eval_crop_matches_torchvision_resize_and_center_crop() -> None:
    prep = Preprocessing.for_image_size(224)
    assert (prep.image_size, prep.resize_size) == (224, 256)
    image = _photo(500, 375, seed=1, noise_level=2)
    ours = np.asarray(eval_crop(image, prep), dtype=np.float32)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(image)
    theirs = np.asarray(reference, dtype=np.float32)
    assert ours.shape == theirs.shape == (224, 224, 3)
    # One resample of the cropped box instead of two steps: sub-pixel differences only.
    assert np.abs(ours - theirs).mean() < 1.5


def test_random_resized_crop_draws_only_from_its_generator() -> None:
    image = _photo(300, 200)
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
    images = [_photo(32, 32, seed=s) for s in range(3)]
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


def test_preprocessing_round_trips_through_json() -> None:
    prep = Preprocessing.for_image_size(320)
    assert Preprocessing.from_json(prep.to_json()) == prep
