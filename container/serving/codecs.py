"""Request bodies in, response bodies out: every content type `/invocations` reads and writes.

A body becomes a list of `ImageInput`s (encoded bytes, or pixels for NumPy input) in request order;
results become JSON or JSON Lines. Nothing here decodes an image or touches the model.

A .zip or .tar body holds many images: each regular file is one, read from the archive held in
memory by `container.archives.read_archive`, within limits checked from the headers first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import sys
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from container.abstention import Override
from container.archives import (
    ArchiveError,
    ArchiveFile,
    ArchiveMemberError,
    ArchiveTooLargeError,
    read_archive,
)
from container.invocations import MAX_PAYLOAD_MB
from container.serving.budget import PixelTally, RequestBudget, over_limit
from container.serving.errors import BadRequestError, NotAcceptableError, UnsupportedMediaTypeError

__all__ = [
    "IMAGE_TYPES",
    "JSON",
    "JSONLINES",
    "READABLE_TYPES",
    "TAR_TYPES",
    "ZIP_TYPES",
    "ImageInput",
    "RequestOptions",
    "choose_response_type",
    "encode",
    "excerpt",
    "parse_custom_attributes",
    "read_inputs",
]

JSON = "application/json"
JSONLINES = "application/jsonlines"
NPY = "application/x-npy"
MULTIPART = "multipart/form-data"
IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/gif",
        "image/tiff",
        "application/x-image",
        "application/octet-stream",
    }
)
_JSONLINES_ALIASES = frozenset({JSONLINES, "application/x-jsonlines", "application/jsonl"})
ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed"})
TAR_TYPES = frozenset(  # a tar, plain or gzip-compressed (told apart by the gzip magic)
    {
        "application/x-tar",
        "application/tar",
        "application/gzip",
        "application/x-gzip",
        "application/x-gtar",
    }
)
READABLE_TYPES = IMAGE_TYPES | _JSONLINES_ALIASES | ZIP_TYPES | TAR_TYPES | {JSON, NPY, MULTIPART}
WRITABLE_TYPES = (JSON, JSONLINES)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_VERSIONS = {(1, 0): 2, (2, 0): 4}  # -> size of the header length; 3.0 adds UTF-8 names
_NPY_MAX_HEADER = 10_000  # numpy's own limit
_NPY_ENTRY = re.compile(
    r"""\s*(?:['"]descr['"]\s*:\s*['"](?P<descr>[<>|=]?[A-Za-z][0-9]{0,3})['"]"""
    r"""|['"]fortran_order['"]\s*:\s*(?P<fortran_order>True|False)"""
    r"""|['"]shape['"]\s*:\s*\((?P<shape>\s*(?:[0-9]{1,20}\s*,\s*)*(?:[0-9]{1,20}\s*)?)\))"""
    r"""\s*(?:,\s*|$)"""
)
_CHANNELS = (1, 3, 4)
_B64_KEYS = ("b64", "image", "data", "image_bytes", "bytes")
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)
_TOO_MANY_FILES = "Too many files"  # how starlette's MultiPartException for max_files starts
_MAX_NAME = 64
_MAX_PATH = 200  # a path inside an archive, in messages
_DEFAULT_MAX_UNPACKED = int(MAX_PAYLOAD_MB * (1 << 20))  # SAGEMAKER_MAX_PAYLOAD_IN_MB's default
# Entries of an archive read for each image allowed: the image, its folder, and the AppleDouble
# twin and folder that macOS's Compress adds under __MACOSX/; and a few more for the folders above.
_ENTRIES_PER_IMAGE = 4
_SPARE_ENTRIES = 64
_JUNK = frozenset({"__macosx", "thumbs.db", "desktop.ini"})  # besides names starting with "."
_MAX_TOP_K = 1000
_TOP_K = re.compile(r"[0-9]{1,4}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NUMBER = re.compile(r"[0-9]{0,3}(\.[0-9]{1,6})?")


@dataclass(frozen=True)
class ImageInput:
    """One image of a request: its name in error messages, and its bytes or its pixels.

    Or neither, with `error` saying why: an archive member whose data cannot be read out of the
    archive (a CRC error, cut short, not the size its header declares). It fails alone, so that
    the server answers for it by name and still answers for the others.
    """

    name: str
    data: bytes | None = None
    pixels: np.ndarray | None = None  # HWC uint8, from NumPy input
    error: str | None = None  # why there is no data, for an archive member only


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options from X-Amzn-SageMaker-Custom-Attributes."""

    top_k: int
    explain: bool
    request_id: str | None
    override: Override


def _media_type(header: str | None) -> str:
    value, _ = parse_options_header(header or "")
    return value.decode("latin-1").strip().lower()


# --- request bodies ------------------------------------------------------------------------------


def excerpt(text: str, limit: int = 40) -> str:
    """Client text safe to quote in a message or a log line: printable characters, and short."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return f"{shown}..." if len(text) > limit else shown


def _json(text: bytes, where: str) -> Any:
    """`json.loads`, with each way it fails on client text turned into a 400 naming `where`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:  # its message is a position, never the text itself
        raise BadRequestError(f"{where} is not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise BadRequestError(
            f"{where} is not valid JSON text ({exc.reason} at byte {exc.start}); send UTF-8"
        ) from exc
    except RecursionError as exc:
        raise BadRequestError(
            f"{where} nests JSON arrays or objects too deeply; send a flat list of base64 images"
        ) from exc
    except ValueError as exc:  # the only other one: an integer longer than Python converts
        raise BadRequestError(
            f"{where} holds an integer of over {sys.get_int_max_str_digits()} digits; "
            "send base64 image strings"
        ) from exc


def _b64(value: Any, name: str) -> bytes:
    while isinstance(value, dict):  # {"b64": ...}, or TF Serving's {"image": {"b64": ...}}
        key = next((k for k in _B64_KEYS if k in value), None)
        if key is None:
            raise BadRequestError(
                f"{name}: a JSON object needs a 'b64' field holding base64 image bytes"
            )
        value = value[key]
    if not isinstance(value, str):
        raise BadRequestError(f"{name}: expected a base64 string, found {type(value).__name__}")
    try:
        return base64.b64decode(_DATA_URL.sub("", value.strip()), validate=True)
    except (binascii.Error, ValueError) as exc:  # binascii's messages never quote the data
        raise BadRequestError(f"{name}: not valid base64 ({exc})") from exc


def _json_inputs(body: bytes, budget: RequestBudget) -> tuple[list[ImageInput], bool]:
    document = _json(body, "the body")
    if isinstance(document, dict) and not {"instances", "images"}.isdisjoint(document):
        document = document.get("instances", document.get("images"))
        if not isinstance(document, list):
            raise BadRequestError("'instances' must be a list of base64 images")
    if isinstance(document, list):
        if not document:
            raise BadRequestError("the request holds an empty list of images")
        budget.check_count(len(document))
        return [
            ImageInput(f"image {i}", _b64(item, f"image {i}")) for i, item in enumerate(document)
        ], True
    return [ImageInput("image", _b64(document, "image"))], False


def _jsonlines_inputs(body: bytes, budget: RequestBudget) -> list[ImageInput]:
    lines = [line for line in body.splitlines() if line.strip()]
    if not lines:
        raise BadRequestError("the body holds no JSON lines")
    budget.check_count(len(lines))
    return [
        ImageInput(f"line {n}", _b64(_json(line, f"line {n}"), f"line {n}"))
        for n, line in enumerate(lines, start=1)
    ]


@dataclass(frozen=True)
class _NpyHeader:
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fortran_order: bool
    offset: int  # where the data starts


def _npy_header(body: bytes) -> _NpyHeader:
    """A .npy header, read with a regex rather than numpy's reader.

    numpy's reader runs `ast.literal_eval` on up to 10 kB of client text (MemoryError,
    RecursionError, TypeError and tokenize.TokenError escape it) and quotes the header in its
    messages; a .npy header is one small, fixed dict, so a regex reads all that numpy writes.
    """
    length_bytes = _NPY_VERSIONS.get((body[6], body[7])) if len(body) >= 8 else None
    if not body.startswith(_NPY_MAGIC) or length_bytes is None:
        raise BadRequestError(
            "the body is not a .npy array of format 1.0 or 2.0; write the array with numpy.save"
        )
    start = 8 + length_bytes
    length = int.from_bytes(body[8:start], "little")
    if len(body) < start + length or length > _NPY_MAX_HEADER:
        raise BadRequestError("the .npy header is cut short or too long; write it with numpy.save")
    text = body[start : start + length].decode("latin-1").strip()
    # `{` entry, entry, entry `}`, each entry matched where the one before it ends
    entries: dict[str, str] = {}
    position, end = 1, len(text) - 1
    while position < end:
        entry = _NPY_ENTRY.match(text, position, end)
        if entry is None or entry.lastgroup is None or entry.lastgroup in entries:
            break
        entries[entry.lastgroup] = entry[entry.lastgroup]
        position = entry.end()
    if text[:1] != "{" or text[end:] != "}" or position != end or len(entries) != 3:
        raise BadRequestError(
            "the .npy header is not one this server reads; send a plain numeric array written "
            "by numpy.save, whose header reads like "
            "{'descr': '<f4', 'fortran_order': False, 'shape': (224, 224, 3)}"
        )
    descr = entries["descr"]
    if descr.lstrip("<>|=")[0] not in "uif":
        raise BadRequestError(
            f"the .npy array's dtype {descr} is not numeric; send uint8 pixels, or floats in [0, 1]"
        )
    try:
        dtype = np.dtype(descr)
    except TypeError as exc:  # a size numpy has no type for, such as <f3
        raise BadRequestError(
            f"the .npy array's dtype {descr} is not one numpy has; send uint8 pixels, or floats "
            "in [0, 1]"
        ) from exc
    shape = tuple(int(d) for d in entries["shape"].replace(",", " ").split())
    return _NpyHeader(dtype, shape, entries["fortran_order"] == "True", start + length)


def _npy_inputs(body: bytes, budget: RequestBudget) -> tuple[list[ImageInput], bool]:
    """(H, W), (H, W, C) or (N, H, W, C) arrays (channels first too); floats in [0, 1] scaled.

    Every size comes from the header and is checked before numpy sees the data, which it then
    reads in place: a header that lies about its shape costs nothing.
    """
    header = _npy_header(body)
    shape = header.shape
    if len(shape) not in (2, 3, 4):
        raise BadRequestError(
            f"expected an (H, W), (H, W, C) or (N, H, W, C) array, got {len(shape)} dimensions"
        )
    if 0 in shape:
        raise BadRequestError(f"the .npy array of shape {shape} is empty; send pixels")
    count, first, second, last = {2: (1, *shape, 1), 3: (1, *shape), 4: shape}[len(shape)]
    channels_first = last not in _CHANNELS and first in _CHANNELS
    if last not in _CHANNELS and not channels_first:
        raise BadRequestError(f"expected 1, 3 or 4 channels, got an array of shape {shape}")
    height, width = (second, last) if channels_first else (first, second)
    declared = math.prod(shape) * header.dtype.itemsize  # Python ints: no overflow
    if declared != len(body) - header.offset:
        raise BadRequestError(
            f"the .npy header says {shape} {header.dtype} ({declared} bytes) but the body holds "
            f"{len(body) - header.offset} bytes of data; write the array with numpy.save"
        )
    budget.check_count(count)
    tally = PixelTally(budget, count)
    for i in range(count):
        tally.add(f"image {i}", width, height)
    array = np.frombuffer(body, header.dtype, count=math.prod(shape), offset=header.offset)
    images = array.reshape((count, first, second, last), order="F" if header.fortran_order else "C")
    if channels_first:
        images = images.transpose(0, 2, 3, 1)
    return [ImageInput(f"image {i}", pixels=p) for i, p in enumerate(_rgb(images))], len(shape) == 4


def _rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) numbers -> (N, H, W, 3) uint8; floats whose largest value is <= 1 scaled."""
    if images.dtype.kind == "f":
        # clip before scaling, so that no infinity overflows the multiplication
        images = np.clip(np.nan_to_num(images, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0)
        if np.max(images) <= 1.0:
            images = images * 255.0
    else:
        images = np.clip(images, 0, 255)
    pixels = images.astype(np.uint8)[..., :3]
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


async def _multipart_inputs(
    body: bytes, content_type: str, budget: RequestBudget
) -> list[ImageInput]:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    # The parser stops at the first file part over the limit, before it spools that part.
    parser = MultiPartParser(
        Headers({"content-type": content_type}),
        stream(),
        max_files=budget.max_images,
        max_fields=budget.max_images,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith(_TOO_MANY_FILES):
            raise over_limit(
                f"the multipart body holds more than {budget.max_images} files; the limit is "
                f"{budget.max_images} images per request, send the rest in further requests",
                "max_images",
            ) from exc
        raise BadRequestError(f"the multipart body cannot be parsed: {exc.message}") from exc
    inputs = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, str):
                continue  # plain form fields carry no image
            name = excerpt(value.filename or field, _MAX_NAME)
            inputs.append(ImageInput(name, await value.read()))
    finally:
        await form.close()
    if not inputs:
        raise BadRequestError("the multipart body has no file parts; send each image as a file")
    return inputs


def _junk(path: str) -> bool:
    """A hidden file, or one the OS adds (`__MACOSX/`, `.DS_Store`, `Thumbs.db`), anywhere."""
    parts = [p for p in re.split(r"[/\\]", path) if p not in ("", ".", "..")]
    return any(p.startswith(".") or p.lower() in _JUNK for p in parts)


def _archive_inputs(
    media: str, body: bytes, budget: RequestBudget, max_unpacked_bytes: int
) -> list[ImageInput]:
    kind: Literal["zip", "tar"] = "zip" if media in ZIP_TYPES else "tar"
    max_entries = _ENTRIES_PER_IMAGE * budget.max_images + _SPARE_ENTRIES
    try:
        files = read_archive(body, kind, max_entries=max_entries, max_bytes=max_unpacked_bytes)
    except ArchiveTooLargeError as exc:
        if exc.limit == "max_entries":
            raise over_limit(
                f"the archive {exc}; {max_entries:,} are read for the limit of "
                f"{budget.max_images} images per request, send fewer files",
                "max_images",
            ) from exc
        raise over_limit(
            f"the archive {exc}; the limit is {max_unpacked_bytes:,} bytes of images unpacked "
            "per request, send fewer or smaller images",
            "max_payload_mb",
        ) from exc
    except ArchiveMemberError as exc:
        raise BadRequestError(f"{excerpt(exc.member, _MAX_PATH)} {exc}") from exc
    except ArchiveError as exc:
        raise BadRequestError(
            f"the {media} body cannot be read: {exc}; send the images as the files of a .zip "
            "(application/zip) or of a .tar or .tar.gz (application/x-tar)"
        ) from exc
    images = [f for f in files if not _junk(f.name)]
    if not images:
        raise BadRequestError(
            "the archive holds no image files (folders, links, hidden files and __MACOSX are "
            "skipped); put the images in it as files"
        )
    budget.check_count(len(images))
    _check_unpacked(images, max_unpacked_bytes)
    return [_archive_input(f) for f in images]


def _check_unpacked(images: list[ArchiveFile], max_unpacked_bytes: int) -> None:
    """413 for sizes, from the headers, over what the request may unpack to."""
    limit = f"the limit is {max_unpacked_bytes:,} bytes unpacked per request"
    for file in images:
        if file.size > max_unpacked_bytes:
            raise over_limit(
                f"{excerpt(file.name, _MAX_PATH)} declares {file.size:,} bytes; {limit}, send "
                "a smaller image",
                "max_payload_mb",
            )
    total = sum(f.size for f in images)
    if total > max_unpacked_bytes:
        raise over_limit(
            f"the archive's {len(images)} images declare {total:,} bytes; {limit}, send fewer "
            "or smaller images per request",
            "max_payload_mb",
        )


def _archive_input(file: ArchiveFile) -> ImageInput:
    name = excerpt(file.name, _MAX_PATH) or "(a file with no name)"
    try:
        return ImageInput(name, file.read())
    except ArchiveMemberError as exc:
        return ImageInput(name, error=excerpt(str(exc), _MAX_PATH))


async def read_inputs(
    content_type: str | None,
    body: bytes,
    budget: RequestBudget,
    max_unpacked_bytes: int = _DEFAULT_MAX_UNPACKED,
) -> tuple[list[ImageInput], bool]:
    """The images of a request in order, and whether the request was a list (multi-image).

    UnsupportedMediaTypeError for a type we do not read, BadRequestError for a body that does not
    hold what its type says, PayloadTooLargeError (naming its setting) for a body over `budget`,
    which is checked as soon as a count or size is known, before any image is read.

    A .zip or .tar body may unpack to `max_unpacked_bytes` (the images' declared sizes, each and
    all together), which the server sets to its payload cap, SAGEMAKER_MAX_PAYLOAD_IN_MB: its
    memory for requests in flight assumes none holds more, and the same images sent as multipart
    are refused at the same size. A bound on the compression ratio instead would let a 6 MB body
    of zeros unpack to hundreds of MB, and no setting could raise it for a user that needs more.
    Images are compressed already, so an archive of them is about the size of its images.
    """
    media = _media_type(content_type)
    if media not in READABLE_TYPES:
        raise UnsupportedMediaTypeError(
            f"Content-Type '{excerpt(content_type or '(none)')}' is not supported; send one of "
            f"{', '.join(sorted(READABLE_TYPES))}"
        )
    if not body:
        raise BadRequestError("the request body is empty; send the image bytes as the body")
    if media == JSON:
        return _json_inputs(body, budget)
    if media in _JSONLINES_ALIASES:
        return _jsonlines_inputs(body, budget), True
    if media == NPY or (media == "application/octet-stream" and body.startswith(_NPY_MAGIC)):
        return _npy_inputs(body, budget)
    if media == MULTIPART:
        inputs = await _multipart_inputs(body, content_type or "", budget)
        return inputs, len(inputs) > 1
    if media in ZIP_TYPES or media in TAR_TYPES:
        # in a thread: decompressing up to the payload cap would hold up the other requests
        inputs = await asyncio.to_thread(_archive_inputs, media, body, budget, max_unpacked_bytes)
        return inputs, True
    return [ImageInput("image", body)], False


# --- options --------------------------------------------------------------------------------------


def _override(pairs: Mapping[str, str], default: Override) -> Override:
    abstain = pairs.get("abstain", "").lower()
    if abstain not in ("", "on", "off", "true", "false"):
        raise BadRequestError(f"custom attribute abstain='{excerpt(abstain)}': use on or off")
    override = default
    if abstain:
        override = replace(override, abstain=abstain in ("on", "true"))
    if "min_confidence" in pairs:
        text = pairs["min_confidence"]
        try:
            value = float(text) if _NUMBER.fullmatch(text) else -1.0
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise BadRequestError(
                f"custom attribute min_confidence='{excerpt(text)}': use a probability "
                "above 0 and at most 1, such as 0.5"
            )
        override = replace(override, min_confidence=value)
    return override


def parse_custom_attributes(
    header: str | None, default_top_k: int, default_override: Override
) -> RequestOptions:
    """`top_k=3, explain=gradcam, request_id=abc, min_confidence=0.5, abstain=off` (commas or
    semicolons between pairs); the endpoint's settings fill what the request leaves out."""
    pairs: dict[str, str] = {}
    for part in re.split(r"[;,]", header or ""):
        key, sep, value = part.partition("=")
        if sep:
            pairs[key.strip().lower()] = value.strip()
    top_k = default_top_k
    if "top_k" in pairs:
        # ASCII digits only: str.isdigit() also passes "²" and "٣"
        if not _TOP_K.fullmatch(pairs["top_k"]) or not 1 <= int(pairs["top_k"]) <= _MAX_TOP_K:
            raise BadRequestError(
                f"custom attribute top_k='{excerpt(pairs['top_k'])}': use a whole number "
                f"from 1 to {_MAX_TOP_K}"
            )
        top_k = int(pairs["top_k"])
    explain = pairs.get("explain", "").lower()
    if explain not in ("", "gradcam", "none"):
        raise BadRequestError(
            f"custom attribute explain='{excerpt(explain)}': the only explanation is gradcam"
        )
    request_id = pairs.get("request_id", pairs.get("id"))
    if request_id is not None and not _REQUEST_ID.fullmatch(request_id):
        # it is echoed in a response header and in the log lines
        raise BadRequestError(
            f"custom attribute request_id='{excerpt(request_id)}': use 1 to 64 characters "
            "of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
        )
    return RequestOptions(
        top_k=top_k,
        explain=explain == "gradcam",
        request_id=request_id,
        override=_override(pairs, default_override),
    )


# --- responses ------------------------------------------------------------------------------------


def _quality(params: dict[bytes, bytes]) -> float:
    try:
        return float(params.get(b"q", b"1"))
    except ValueError:
        return 0.0  # a malformed weight counts as "not acceptable"


def choose_response_type(accept: str | None, default: str) -> str:
    """The response media type for an Accept header; NotAcceptableError when we write none."""
    if not accept or not accept.strip():
        return default
    ranked = []
    for position, part in enumerate(accept.split(",")):
        value, params = parse_options_header(part)
        ranked.append((-_quality(params), position, value.decode("latin-1").strip().lower()))
    for negative_quality, _, media in sorted(ranked):
        if negative_quality == 0:
            continue
        if media in ("*/*", "application/*"):
            return default
        if media in _JSONLINES_ALIASES:
            return JSONLINES
        if media == JSON:
            return JSON
    raise NotAcceptableError(
        f"Accept '{excerpt(accept)}' names no type this server writes; "
        f"ask for {' or '.join(WRITABLE_TYPES)}"
    )


def encode(
    records: Sequence[dict[str, Any]], media_type: str, many: bool, extra: dict[str, Any]
) -> bytes:
    """JSON: one object (a `results` list when the request held a list); JSON Lines: one a line."""
    if media_type == JSONLINES:
        return b"".join(json.dumps({**r, **extra}).encode() + b"\n" for r in records)
    if many:
        return json.dumps({"results": list(records), **extra}).encode()
    return json.dumps({**records[0], **extra}).encode()
