"""Decoding: header checks before any pixel is decoded, estimates, and what every image becomes."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from container.decoding import (
    DecodeLimits,
    ImageDecodeError,
    ImageTooLargeError,
    Preprocessing,
    decode,
    eval_crop,
    load_rgb,
    open_image,
)
from tests.crafted import gradient_photo, png_header

MiB = 1 << 20


def _encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _many_scan_jpeg(refinements: int) -> bytes:
    """A real 8x8 grey progressive JPEG of 1 + 63 * (refinements + 1) scans.

    Every coefficient is zero, so each scan's data is one Huffman code (a 1-bit '0' for "DC
    difference 0" or "end of block") padded with 1s: a DC scan, then for each AC coefficient its own
    first scan at successive-approximation bit `refinements` and one refinement scan per bit below.
    """
    one_code = b"\x01" + b"\x00" * 15 + b"\x00"  # one code of length 1, for symbol 0
    jpeg = b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64)  # quantisation: all 1
    jpeg += _segment(0xC2, struct.pack(">BHHB", 8, 8, 8, 1) + b"\x01\x11\x00")  # SOF2, 1 component
    jpeg += _segment(0xC4, b"\x00" + one_code) + _segment(0xC4, b"\x10" + one_code)

    def scan(first: int, last: int, high: int, low: int) -> bytes:
        return _segment(0xDA, bytes((1, 1, 0x00, first, last, high << 4 | low))) + b"\x7f"

    jpeg += scan(0, 0, 0, 0)
    for k in range(1, 64):
        jpeg += scan(k, k, 0, refinements)
        jpeg += b"".join(scan(k, k, bit + 1, bit) for bit in reversed(range(refinements)))
    return jpeg + b"\xff\xd9"


def _rle8_bmp(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP: each row one red pixel, then end-of-line (the rest of the row is 0)."""
    palette = b"".join(bytes((0, 0, 255 if i == 1 else 0, 0)) for i in range(256))
    pixels = b"\x01\x01\x00\x00" * height + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return (
        b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels
    )


# --- decoding ----------------------------------------------------------------------------------


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_target() -> None:
    data = _encode(gradient_photo(3000, 2000))
    assert decode(data).size == (3000, 2000)
    reduced = decode(data, min_side=256)
    assert reduced.size == (750, 500)  # 1/4 scale: 1/8 would make the short side 250 < 256
    assert min(decode(data, min_side=224).size) >= 224


def test_small_jpeg_is_decoded_whole() -> None:
    assert decode(_encode(gradient_photo(500, 375)), min_side=256).size == (500, 375)


def test_an_mpo_is_read_as_its_first_image_at_reduced_scale() -> None:
    first, second = Image.new("RGB", (640, 480), "red"), Image.new("RGB", (640, 480), "blue")
    opened, header = open_image(
        _encode(first, "MPO", save_all=True, append_images=[second]), DecodeLimits(), 64
    )
    assert (header.format, header.width, header.height) == ("MPO", 640, 480)
    image = load_rgb(opened)
    assert image.size == (160, 120)  # 1/4 scale: 1/8 would make the short side 60 < 64
    assert image.getpixel((80, 60)) == pytest.approx((254, 0, 0), abs=2)


def test_exif_orientation_is_applied() -> None:
    image = gradient_photo(400, 200)
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
    [
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("I;16", "PNG"),
        ("1", "PNG"),
        ("RGB", "WEBP"),
        ("P", "GIF"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
    ],
)
def test_every_mode_decodes_to_rgb(mode: str, fmt: str) -> None:
    image = gradient_photo(64, 48).convert(mode)
    decoded = decode(_encode(image, fmt))
    assert (decoded.mode, decoded.size) == ("RGB", (64, 48))


def test_sixteen_bit_greyscale_keeps_its_range() -> None:
    array = np.full((8, 8), 40000, dtype=np.uint16)
    decoded = decode(_encode(Image.fromarray(array), "PNG"))
    assert decoded.getpixel((0, 0)) == (156, 156, 156)  # 40000 >> 8, not clipped to 255


def test_eval_crop_matches_torchvision_resize_and_center_crop() -> None:
    prep = Preprocessing.for_image_size(224)
    assert (prep.image_size, prep.resize_size) == (224, 256)
    image = gradient_photo(500, 375, seed=1, noise_level=2)
    ours = np.asarray(eval_crop(image, prep), dtype=np.float32)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(image)
    theirs = np.asarray(reference, dtype=np.float32)
    assert ours.shape == theirs.shape == (224, 224, 3)
    # One resample of the cropped box instead of two steps: sub-pixel differences only.
    assert np.abs(ours - theirs).mean() < 1.5


def test_preprocessing_round_trips_through_json() -> None:
    prep = Preprocessing.for_image_size(320)
    assert Preprocessing.from_json(prep.to_json()) == prep


# --- what is refused, and what the client is told -----------------------------------------------

_UNREADABLE = "not an image in a format this server reads (JPEG, PNG, WebP, GIF, BMP, TIFF)"
_CORRUPT = "the image data is truncated or corrupt"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", _UNREADABLE),
        (b"not an image at all", _UNREADABLE),
        (b"P6\n4 4\n255\n" + bytes(48), _UNREADABLE),  # PPM: Pillow reads it, we do not
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", _UNREADABLE),
        (_encode(Image.new("RGB", (32, 32)), "ICO"), _UNREADABLE),
        (_encode(gradient_photo(64, 64))[:200], _CORRUPT),  # truncated JPEG
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, _CORRUPT),  # PNG signature, garbage after
        (png_header(100, 100), _CORRUPT),  # a header and no image data
        (b"GIF89a\x01", _CORRUPT),
    ],
)
def test_bad_bytes_get_a_client_safe_message_and_the_cause_in_detail(
    data: bytes, message: str
) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode(data)
    assert str(info.value) == message
    assert info.value.detail  # what Pillow said, for the log


def test_no_message_shows_a_repr_an_address_or_a_path() -> None:
    bad = [
        b"",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        _rle8_bmp(16, 4),
        png_header(50_000, 50_000),
        png_header(8000, 6000),
        _many_scan_jpeg(1),
    ]
    for data in bad:
        with pytest.raises(ImageDecodeError) as info:
            decode(data)
        message = str(info.value)
        assert not re.search(r"\b0x[0-9a-f]+", message), message  # a heap address
        for leak in ("<_io", "/", "Error", "Traceback"):
            assert leak not in message, message


def test_an_image_over_the_pixel_limit_is_refused_from_its_header() -> None:
    # No image data at all: a refusal, not "corrupt", shows nothing was decoded.
    with pytest.raises(ImageTooLargeError) as info:
        open_image(png_header(8000, 6000), DecodeLimits())
    assert str(info.value) == (
        "the image is 8000x6000 pixels (48 MP); the limit is 40 MP per image, use a smaller image"
    )
    assert info.value.limit == "max_image_pixels"
    _, header = open_image(png_header(8000, 6000), DecodeLimits(max_image_pixels=48_000_000))
    assert (header.width, header.height, header.pixels) == (8000, 6000, 48_000_000)


def test_pillow_s_own_decompression_bomb_check_is_a_too_large_error() -> None:
    with pytest.raises(ImageTooLargeError, match=r"more than 179 MP") as info:
        open_image(png_header(50_000, 50_000), DecodeLimits(max_image_pixels=10**10))
    assert info.value.limit == "max_image_pixels"


def test_the_pixel_limit_counts_a_jpeg_s_full_size_not_its_draft() -> None:
    data = _encode(gradient_photo(3000, 2000))  # 6 MP; 750x500 at the 1/4 draft scale
    with pytest.raises(ImageTooLargeError, match=r"3000x2000 pixels \(6 MP\); the limit is 5 MP"):
        decode(data, min_side=256, limits=DecodeLimits(max_image_pixels=5_000_000))
    assert decode(data, min_side=256, limits=DecodeLimits(max_image_pixels=6_000_000)).size == (
        750,
        500,
    )


def test_run_length_encoded_bmp_is_refused_before_decoding() -> None:
    """Pillow's RLE BMP decoder is a Python loop: 40 MP of it takes seconds from a 6 KB file."""
    with pytest.raises(ImageDecodeError) as info:
        open_image(_rle8_bmp(40_000, 1000), DecodeLimits())
    assert not isinstance(info.value, ImageTooLargeError)
    assert str(info.value) == (
        "the image is a run-length-encoded (RLE) BMP, which this server does not decode; send it "
        "as PNG or JPEG"
    )
    assert decode(_encode(gradient_photo(16, 4), "BMP")).size == (16, 4)  # uncompressed BMP is fine


# --- progressive JPEG scans ----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "scans"), [("RGB", 10), ("L", 6)])
def test_scans_of_a_progressive_jpeg_are_counted(mode: str, scans: int) -> None:
    image = gradient_photo(64, 48).convert(mode)
    _, header = open_image(_encode(image, progressive=True), DecodeLimits())
    assert header.scans == scans  # libjpeg's default progression for 3 and 1 components
    _, baseline = open_image(_encode(image), DecodeLimits())
    assert baseline.scans == 0


def test_a_jpeg_of_too_many_scans_is_refused_and_decodes_when_allowed() -> None:
    data = _many_scan_jpeg(refinements=1)  # 1 + 63 * 2 scans
    with pytest.raises(ImageTooLargeError) as info:
        open_image(data, DecodeLimits())
    assert str(info.value) == (
        "the image is a progressive JPEG of 127 scans; the limit is 64 scans per image, use a "
        "baseline JPEG or fewer scans"
    )
    assert info.value.limit == "max_jpeg_scans"
    # The file is a real JPEG: libjpeg decodes it (all coefficients 0: mid grey).
    image = decode(data, limits=DecodeLimits(max_jpeg_scans=127))
    assert (image.size, image.getpixel((4, 4))) == ((8, 8), (128, 128, 128))
    assert decode(data, limits=None).size == (8, 8)


# --- memory estimates ----------------------------------------------------------------------------


def test_estimates_count_the_stored_mode_and_the_conversion_to_rgb() -> None:
    n = 100 * 80
    grey16 = _encode(Image.fromarray(np.full((80, 100), 40000, dtype=np.uint16)), "PNG")
    _, header = open_image(grey16, DecodeLimits())
    assert header.mode == "I;16"
    # 2 bytes stored, then NumPy's copy (2), its shifted copy (2) and the 8-bit result (1).
    assert header.estimated_bytes == MiB + n * (2 + 5)
    _, header = open_image(_encode(gradient_photo(100, 80).convert("RGBA"), "PNG"), DecodeLimits())
    assert header.estimated_bytes == MiB + n * (4 + 5)  # RGBA, a white canvas and the alpha band
    _, header = open_image(_encode(gradient_photo(100, 80), "PNG"), DecodeLimits())
    assert header.estimated_bytes == MiB + n * 4  # RGB is decoded as is


def test_estimates_count_an_exif_rotation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = open_image(_encode(gradient_photo(400, 200)), DecodeLimits())[1]
    rotated = open_image(_encode(gradient_photo(400, 200), exif=exif.tobytes()), DecodeLimits())[1]
    assert rotated.estimated_bytes - upright.estimated_bytes == 400 * 200 * 4


def test_a_progressive_jpeg_costs_its_full_size_coefficients_at_any_draft_scale() -> None:
    image = gradient_photo(3000, 2000)
    baseline = open_image(_encode(image), DecodeLimits(), min_side=256)[1]
    progressive = open_image(_encode(image, progressive=True), DecodeLimits(), min_side=256)[1]
    assert baseline.estimated_bytes == MiB + 750 * 500 * 4  # the draft scale, decoded row by row
    # 4:2:0: Y in 376x250 blocks (whole 2x2 MCUs), Cb and Cr in 188x125; 64 16-bit values each.
    coefficients = (376 * 250 + 2 * 188 * 125) * 64 * 2
    assert progressive.estimated_bytes == baseline.estimated_bytes + coefficients


def test_a_thumbnail_inside_a_baseline_jpeg_is_not_taken_for_a_second_scan() -> None:
    data = _encode(gradient_photo(3000, 2000))
    thumbnail = _encode(gradient_photo(160, 120), progressive=True)
    with_thumbnail = data[:2] + _segment(0xE2, thumbnail) + data[2:]
    plain = open_image(data, DecodeLimits(), min_side=256)[1]
    assert open_image(with_thumbnail, DecodeLimits(), min_side=256)[1] == plain


def test_an_image_over_the_memory_limit_is_refused_from_its_header() -> None:
    data = _encode(gradient_photo(100, 80).convert("RGBA"), "PNG")
    estimate = MiB + 100 * 80 * 9
    assert decode(data, limits=DecodeLimits(max_decode_bytes=estimate)).size == (100, 80)
    with pytest.raises(ImageTooLargeError, match=r"about 1\.1 MiB; the limit is 1\.1 MiB") as info:
        decode(data, limits=DecodeLimits(max_decode_bytes=estimate - 1))
    assert info.value.limit == "max_decode_bytes"
