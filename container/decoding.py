"""Bytes to RGB images, without torch: the decoding half of the one preprocessing path.

The server decodes in worker processes that must not import torch, and training decodes in loader
workers; both come here. An image is first *opened* (its header only), checked against a budget of
pixels, progressive-JPEG scans and estimated memory, and only then decoded, so a file built to cost
seconds or gigabytes is refused for the price of reading its header. JPEGs are decoded at reduced
DCT scale when the target is much smaller, and crops resize in one resampling step.
"""

from __future__ import annotations

import io
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import (
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_JPEG_SCANS",
    "FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REDUCING_GAP",
    "RESAMPLE",
    "DecodeLimits",
    "ImageDecodeError",
    "ImageHeader",
    "ImageTooLargeError",
    "Preprocessing",
    "decode",
    "eval_box",
    "eval_crop",
    "load_rgb",
    "open_image",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_JPEG_SCANS = 64

# The only Pillow plugins that may parse client bytes: what docs/serving.md promises, nothing more
# (Pillow also reads EPS via Ghostscript, ICO, PSD, FITS, ... each a parser nobody here needs).
FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# What to pass Image.open: the JPEG plugin itself opens an MPO file (a JPEG with more images).
_OPENERS = tuple(name for name in FORMATS if name != "MPO")

RESAMPLE = Image.Resampling.BILINEAR
# Pillow first shrinks by an integer factor with a box filter while the image is more than this
# many times the target; at 3 the result is indistinguishable from a full resample and much faster.
REDUCING_GAP = 3.0

_JPEG_FORMATS = ("JPEG", "MPO")
_SOS = b"\xff\xda"  # start of scan: byte stuffing keeps it out of entropy-coded data
# A marker segment with a length: 0xFF (any number: fill bytes) and a code other than a stuffed 0,
# TEM, RSTn or SOI (which have no length and, like other bytes between segments, are skipped).
_SEGMENT = re.compile(rb"\xff+([^\x00\x01\xd0-\xd8\xff])", re.DOTALL)
_NOT_AN_IMAGE = "not an image in a format this server reads (JPEG, PNG, WebP, GIF, BMP, TIFF)"
_CORRUPT = "the image data is truncated or corrupt"
_WHITE = (255, 255, 255)
_MiB = 1 << 20
# Pillow's Python-level decoders (`ImageFile.PyDecoder`, registered in Image.DECODERS) loop in
# Python per run or per byte, so the pixel cap does not bound their time: a 6 KB RLE BMP keeps
# bmp_rle busy for 4 s at 40 MP. In Pillow 13 it is the only one FORMATS can reach; any other an
# image would need is refused too.
_PYTHON_DECODERS = {"bmp_rle": "a run-length-encoded (RLE) BMP"}
# How many bytes Pillow stores per pixel; every mode not listed takes 4 (RGB is stored as RGBX).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Where Pillow finds a PNG's orientation: an eXIf chunk, or EXIF or XMP in a text chunk.
_PNG_ORIENTATION_KEYS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")
_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I")


class ImageDecodeError(ValueError):
    """Raised when bytes are not a usable image: an unread format, corrupt or truncated data.

    `str(exc)` is safe to show a client (no repr, address, path or traceback); `detail` holds what
    the underlying library said, for the server log.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ImageTooLargeError(ImageDecodeError):
    """Raised, from the header and before decoding, for an image over a `DecodeLimits` budget.

    `limit` names the `DecodeLimits` field exceeded; the message gives the image's figure and the
    limit, and the caller adds which setting raises it.
    """

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class DecodeLimits:
    """What one decode may cost, checked from the header before any pixel is decoded."""

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height in the header, before draft
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS  # scans of a progressive JPEG
    max_decode_bytes: int | None = None  # estimated peak memory of the decode; None: unchecked


_UNLIMITED = DecodeLimits(max_image_pixels=sys.maxsize, max_jpeg_scans=sys.maxsize)


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an opened image says, and what decoding it will cost.

    `width` and `height` are the size the file declares; a JPEG opened with `min_side` decodes to
    the opened image's (smaller) size. `scans` is the number of scans of a progressive JPEG (0 for
    every other image), and `estimated_bytes` the peak memory of decoding plus conversion to RGB
    (see `_estimated_bytes`).
    """

    format: str
    width: int
    height: int
    mode: str
    scans: int
    estimated_bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class Preprocessing:
    """How a model's inputs are made; stored in the model artifact so `serve` does the same."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def for_image_size(cls, image_size: int) -> Preprocessing:
        """The usual 0.875 centre-crop ratio: 224 -> resize 256, crop 224."""
        return cls(image_size=image_size, resize_size=round(image_size / 0.875))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        """Read by name: other keys are ignored (artifacts written before 2026-12 carry a
        `version` that nothing read)."""
        return cls(
            image_size=int(data["image_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
        )


def decode(
    source: bytes | Path,
    *,
    min_side: int | None = None,
    limits: DecodeLimits | None = DecodeLimits(),
) -> Image.Image:
    """Decode an image file to an RGB Pillow image: `open_image`, then `load_rgb`.

    `limits=None` skips the budget checks (Pillow's own decompression-bomb check still applies);
    the format and decoder restrictions always apply.
    """
    if isinstance(source, bytes):
        data = source
    else:
        # Reading the bytes first means no file handle outlives a failed decode.
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ImageDecodeError("the image file cannot be read", _detail(exc)) from exc
    opened, _ = open_image(data, _UNLIMITED if limits is None else limits, min_side)
    return load_rgb(opened)


def open_image(
    data: bytes, limits: DecodeLimits, min_side: int | None = None
) -> tuple[Image.Image, ImageHeader]:
    """Read the header of an image and check it against `limits`; decode nothing.

    With `min_side`, a JPEG is set to decode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides >= min_side: a 6 MP photo for a 256 px target decodes ~3x faster. The pixel limit
    still counts the full size, so the budget does not depend on who asks.
    """
    opened = _open(data)
    width, height = opened.size
    if width * height > limits.max_image_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} pixels ({_mp(width * height)}); the limit is "
            f"{_mp(limits.max_image_pixels)} per image, use a smaller image",
            "max_image_pixels",
        )
    for tile in opened.tile:
        if tile.codec_name in Image.DECODERS:  # see _PYTHON_DECODERS
            kind = _PYTHON_DECODERS.get(tile.codec_name, f"a {opened.format} of a slow kind")
            raise ImageDecodeError(
                f"the image is {kind}, which this server does not decode; send it as PNG or JPEG",
                f"Pillow's Python decoder {tile.codec_name!r}",
            )
    format_ = opened.format or ""
    scans = _progressive_scans(opened, data)
    if scans > limits.max_jpeg_scans:
        raise ImageTooLargeError(
            f"the image is a progressive JPEG of {scans} scans; the limit is "
            f"{limits.max_jpeg_scans} scans per image, use a baseline JPEG or fewer scans",
            "max_jpeg_scans",
        )
    try:
        if min_side is not None and format_ in _JPEG_FORMATS:
            opened.draft("RGB", (min_side, min_side))
        estimated = _estimated_bytes(opened, data, (width, height))
    except MemoryError:
        raise
    except Exception as exc:  # see _open: a malformed header may fail in many ways
        raise ImageDecodeError(_CORRUPT, _detail(exc)) from exc
    if limits.max_decode_bytes is not None and estimated > limits.max_decode_bytes:
        raise ImageTooLargeError(
            f"decoding the image would take about {estimated / _MiB:.1f} MiB; the limit is "
            f"{limits.max_decode_bytes / _MiB:.1f} MiB per image, use a smaller image",
            "max_decode_bytes",
        )
    return opened, ImageHeader(format_, width, height, opened.mode, scans, estimated)


def load_rgb(opened: Image.Image) -> Image.Image:
    """Decode an image from `open_image` to RGB, upright per its EXIF orientation.

    Transparent images are composited on white (what a viewer shows), not stripped to whatever
    colour hides under alpha. `opened` is consumed: it is rotated in place.
    """
    try:
        opened.load()
        ImageOps.exif_transpose(opened, in_place=True)  # in place: no copy when upright already
        return _to_rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _pillow_bomb(exc) from exc  # GIF frames and TIFF tiles are checked when loaded
    except MemoryError:
        raise  # the caller's to handle: its heap, not the image, is the problem
    except Exception as exc:  # see _open
        raise ImageDecodeError(_CORRUPT, _detail(exc)) from exc


def _open(data: bytes) -> ImageFile.ImageFile:
    try:
        return Image.open(io.BytesIO(data), formats=_OPENERS)
    except UnidentifiedImageError as exc:
        # Pillow says the same for a corrupt PNG as for a PDF; the signature tells them apart.
        message = _CORRUPT if _has_known_signature(data) else _NOT_AN_IMAGE
        raise ImageDecodeError(message, _detail(exc)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _pillow_bomb(exc) from exc
    except MemoryError:
        raise
    # Pillow signals corrupt input with many exception types (OSError, SyntaxError, struct.error,
    # ValueError, EOFError, ...); at this boundary every one of them means "not a usable image".
    except Exception as exc:
        raise ImageDecodeError(_CORRUPT, _detail(exc)) from exc


def _has_known_signature(data: bytes) -> bool:
    """Whether one of the FORMATS plugins recognises the file's first bytes, as Image.open does."""
    Image.init()
    prefix = data[:16]
    return any(
        accept is not None and bool(accept(prefix))
        for name, (_, accept) in Image.OPEN.items()
        if name in FORMATS
    )


def _progressive_scans(opened: Image.Image, data: bytes) -> int:
    """The scans of a progressive JPEG (0 for any other image): libjpeg's time grows with each.

    Every SOS marker in the file counts: a marker can only be a real one (entropy-coded data stuffs
    each 0xFF with 0x00), so the count cannot be hidden, only inflated by an embedded thumbnail or
    an MPO's later images.
    """
    if opened.format not in _JPEG_FORMATS or not _is_progressive(opened):
        return 0
    return data.count(_SOS)


def _is_progressive(opened: Image.Image) -> bool:
    return bool(opened.info.get("progressive") or opened.info.get("progression"))


def _estimated_bytes(opened: ImageFile.ImageFile, data: bytes, size: tuple[int, int]) -> int:
    """The peak memory of `load_rgb` on `opened`, from its header; `size` is the declared size.

    With n the pixels the decoder outputs (a JPEG's draft size, else the declared size) and b the
    bytes Pillow stores per pixel of the decoded mode (1 for "1"/"L"/"P", 2 for 16-bit greyscale,
    4 for every other mode, RGB included), the estimate is

        1 MiB + n * b + max(decoder buffers, n * max(rotation, conversion))   (WebP: see below)

    - 1 MiB: decoder state, row buffers and allocator slack.
    - n * b: the decoded image.
    - decoder buffers, freed when decoding ends: a JPEG of more than one scan (progressive, or a
      non-interleaved baseline) makes libjpeg hold every DCT coefficient of the *full-size* image,
      whatever the draft scale: 2 bytes for each of 64 per 8x8 block of every component at its
      chroma subsampling, ~3 bytes per pixel at 4:2:0. libtiff decodes one strip or tile into a
      buffer of up to 8 bytes per pixel. A one-scan JPEG, PNG, GIF and BMP decode row by row into
      the image.
    - rotation: when the EXIF orientation is not 1, `exif_transpose` makes the upright image before
      the original is freed (b). A PNG counts as rotated when it holds an eXIf chunk or EXIF or XMP
      text anywhere, since Pillow reads those after the image data only when it decodes.
    - conversion (`_to_rgb`): RGB 0; RGBA 5 (a white RGB canvas and the alpha band); LA, PA and P
      with transparency 9 (an RGBA copy first); 16- and 32-bit greyscale 2b + 1 (NumPy's copy, its
      shifted copy and the 8-bit result); every other mode 4 (the RGB copy).
    - WebP: libwebp's animation decoder keeps a copy of the file and two RGBA canvases while the
      image is open, and Pillow copies the frame out of them: len(data) + 12n, added, not maxed.

    Measured against the peak resident memory of `load_rgb` on 6 MP images of each kind (JPEG
    baseline and progressive at full and draft scale, rotated or not; PNG RGB, RGBA, L, 16-bit;
    GIF with transparency; WebP; BMP; TIFF raw and LZW) this is 0-15% above, never below; a TIFF
    of one large strip comes out up to 1.7x above.
    """
    n = opened.size[0] * opened.size[1]
    stored = _STORED_BYTES.get(opened.mode, 4)
    rotation = stored if _may_rotate(opened, data) else 0
    converting = n * max(rotation, _conversion(opened))
    if opened.format == "WEBP":
        return _MiB + len(data) + 12 * n + n * stored + converting
    return _MiB + n * stored + max(_decoder_bytes(opened, data, size), converting)


def _decoder_bytes(opened: ImageFile.ImageFile, data: bytes, size: tuple[int, int]) -> int:
    if isinstance(opened, JpegImagePlugin.JpegImageFile):
        # libjpeg's own test (jdinput.c): more than one scan when the first scan codes fewer
        # components than the frame has, or the JPEG is progressive. Reading the first scan's
        # header is enough; counting markers would walk the whole file (1 ms for 1.4 MB).
        first = _first_scan(data)
        in_first_scan = data[first + 4] if first + 4 < len(data) else len(opened.layer)
        if _is_progressive(opened) or in_first_scan < len(opened.layer):
            return _coefficient_bytes(opened.layer, size)
    elif isinstance(opened, TiffImagePlugin.TiffImageFile) and opened.use_load_libtiff:
        width, height = size
        tags = opened.tag_v2
        if TiffImagePlugin.TILEWIDTH in tags:
            block = int(tags[TiffImagePlugin.TILEWIDTH]) * int(tags[TiffImagePlugin.TILELENGTH])
        else:
            block = width * int(tags.get(TiffImagePlugin.ROWSPERSTRIP, height))
        return 8 * min(block, width * height)
    return 0


def _first_scan(data: bytes) -> int:
    """Where a JPEG's first scan starts: after the marker segments, so an EXIF thumbnail's scan
    is not taken for one of the image's own. Bytes between segments are skipped, as libjpeg does."""
    position = 2  # after SOI
    while (found := _SEGMENT.search(data, position)) is not None:
        if found[1] == _SOS[1:]:
            return found.start()
        position = found.end() + int.from_bytes(data[found.end() : found.end() + 2], "big")
    return len(data)


def _coefficient_bytes(components: list[tuple[int, int, int, int]], size: tuple[int, int]) -> int:
    """libjpeg's whole-image coefficient arrays: per component, its 8x8 blocks (rounded up to
    whole MCUs) x 64 coefficients x 2 bytes. `components` is Pillow's (id, h, v, table) list."""
    width, height = size
    h_max = max(max(h for _, h, _, _ in components), 1)
    v_max = max(max(v for _, _, v, _ in components), 1)
    total = 0
    for _, h, v, _ in components:
        blocks_x = _round_up(math.ceil(width * h / (8 * h_max)), max(h, 1))
        blocks_y = _round_up(math.ceil(height * v / (8 * v_max)), max(v, 1))
        total += blocks_x * blocks_y * 64 * 2
    return total


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _may_rotate(opened: Image.Image, data: bytes) -> bool:
    if opened.format == "PNG":
        # PngImageFile.getexif() would decode the image to look for EXIF after the image data.
        return any(key in data for key in _PNG_ORIENTATION_KEYS)
    return opened.getexif().get(_ORIENTATION, 1) in range(2, 9)


def _conversion(opened: Image.Image) -> int:
    """Bytes per pixel that `_to_rgb` holds on top of the image it converts."""
    mode = opened.mode
    if mode == "RGB":
        return 0
    if mode == "RGBA":
        return 5
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in opened.info):
        return 9
    if mode in _INTEGER_MODES:
        return 2 * _STORED_BYTES.get(mode, 4) + 1
    return 4


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image  # convert() would copy it for nothing
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in _INTEGER_MODES:
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    return image.convert("RGB")


def _pillow_bomb(exc: Exception) -> ImageTooLargeError:
    """Pillow's own decompression-bomb check (its MAX_IMAGE_PIXELS; twice that is an error)."""
    threshold = Image.MAX_IMAGE_PIXELS or 0
    if isinstance(exc, Image.DecompressionBombError):
        threshold *= 2
    return ImageTooLargeError(
        f"the image has more than {_mp(threshold)}, more than the decoder accepts at all; use a "
        "smaller image",
        "max_image_pixels",
    )


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


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
    return image.resize(size, RESAMPLE, box=eval_box(image.size, prep), reducing_gap=REDUCING_GAP)
