"""Request bodies in, response bodies out: every content type `/invocations` reads and writes.

A body becomes a list of `ImageInput`s (encoded bytes, or pixels for NumPy input) in request order;
results become JSON or JSON Lines. Nothing here decodes an image or touches the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from container.serving.errors import BadRequestError, NotAcceptableError, UnsupportedMediaTypeError

__all__ = [
    "IMAGE_TYPES",
    "JSON",
    "JSONLINES",
    "READABLE_TYPES",
    "ImageInput",
    "RequestOptions",
    "choose_response_type",
    "encode",
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
READABLE_TYPES = IMAGE_TYPES | _JSONLINES_ALIASES | {JSON, NPY, MULTIPART}
WRITABLE_TYPES = (JSON, JSONLINES)
_NPY_MAGIC = b"\x93NUMPY"
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)
_MAX_TOP_K = 1000


@dataclass(frozen=True)
class ImageInput:
    """One image of a request: its name in error messages, and its bytes or its pixels."""

    name: str
    data: bytes | None = None
    pixels: np.ndarray | None = None  # HWC uint8, from NumPy input


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options from X-Amzn-SageMaker-Custom-Attributes."""

    top_k: int
    explain: bool
    request_id: str | None


def _media_type(header: str | None) -> str:
    value, _ = parse_options_header(header or "")
    return value.decode("latin-1").strip().lower()


# --- request bodies ------------------------------------------------------------------------------


def _b64(value: Any, name: str) -> bytes:
    if isinstance(value, dict):
        for key in ("b64", "image", "data", "image_bytes", "bytes"):
            if key in value:
                return _b64(value[key], name)
        raise BadRequestError(
            f"{name}: a JSON object needs a 'b64' field holding base64 image bytes"
        )
    if not isinstance(value, str):
        raise BadRequestError(f"{name}: expected a base64 string, found {type(value).__name__}")
    try:
        return base64.b64decode(_DATA_URL.sub("", value.strip()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{name}: not valid base64 ({exc})") from exc


def _json_inputs(body: bytes) -> tuple[list[ImageInput], bool]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON ({exc}); send application/json") from exc
    if isinstance(document, dict) and not {"instances", "images"}.isdisjoint(document):
        document = document.get("instances", document.get("images"))
        if not isinstance(document, list):
            raise BadRequestError("'instances' must be a list of base64 images")
    if isinstance(document, list):
        if not document:
            raise BadRequestError("the request holds an empty list of images")
        return [
            ImageInput(f"image {i}", _b64(item, f"image {i}")) for i, item in enumerate(document)
        ], True
    return [ImageInput("image", _b64(document, "image"))], False


def _jsonlines_inputs(body: bytes) -> list[ImageInput]:
    lines = [line for line in body.splitlines() if line.strip()]
    if not lines:
        raise BadRequestError("the body holds no JSON lines")
    inputs = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequestError(f"line {n} is not valid JSON ({exc})") from exc
        inputs.append(ImageInput(f"line {n}", _b64(record, f"line {n}")))
    return inputs


def _npy_inputs(body: bytes) -> tuple[list[ImageInput], bool]:
    """(H, W), (H, W, C) or (N, H, W, C) arrays (channels first too); floats in [0, 1] scaled."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)  # never unpickle client data
    except (ValueError, OSError, EOFError) as exc:
        raise BadRequestError(f"the body is not a NumPy .npy array ({exc})") from exc
    shapes = {2: (None, Ellipsis, None), 3: (None, Ellipsis), 4: (Ellipsis,)}
    if array.ndim not in shapes or array.dtype.kind not in "uif" or 0 in array.shape:
        raise BadRequestError(
            f"expected a numeric (H, W, C) or (N, H, W, C) array, got {array.dtype} {array.shape}"
        )
    images = array[shapes[array.ndim]]
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        images = images.transpose(0, 2, 3, 1)  # channels first
    if images.shape[-1] not in (1, 3, 4):
        raise BadRequestError(f"expected 1, 3 or 4 channels, got an array of shape {array.shape}")
    if images.dtype.kind == "f":
        images = np.nan_to_num(images) * (255.0 if np.max(images) <= 1.0 else 1.0)
    pixels = np.clip(images, 0, 255).astype(np.uint8)[..., :3]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return [ImageInput(f"image {i}", pixels=p) for i, p in enumerate(pixels)], array.ndim == 4


async def _multipart_inputs(body: bytes, content_type: str) -> list[ImageInput]:
    async def stream() -> Any:
        yield body

    parser = MultiPartParser(Headers({"content-type": content_type}), stream())
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequestError(f"the multipart body cannot be parsed: {exc.message}") from exc
    inputs = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, str):
                continue  # plain form fields carry no image
            name = value.filename or field
            inputs.append(ImageInput(name, await value.read()))
    finally:
        await form.close()
    if not inputs:
        raise BadRequestError("the multipart body has no file parts; send each image as a file")
    return inputs


async def read_inputs(content_type: str | None, body: bytes) -> tuple[list[ImageInput], bool]:
    """The images of a request in order, and whether the request was a list (multi-image).

    UnsupportedMediaTypeError for a type we do not read, BadRequestError for a body that does not
    hold what its type says.
    """
    media = _media_type(content_type)
    if media not in READABLE_TYPES:
        raise UnsupportedMediaTypeError(
            f"Content-Type {content_type or '(none)'!r} is not supported; send one of "
            f"{', '.join(sorted(READABLE_TYPES))}"
        )
    if not body:
        raise BadRequestError("the request body is empty; send the image bytes as the body")
    if media == JSON:
        return _json_inputs(body)
    if media in _JSONLINES_ALIASES:
        return _jsonlines_inputs(body), True
    if media == NPY or (media == "application/octet-stream" and body.startswith(_NPY_MAGIC)):
        return _npy_inputs(body)
    if media == MULTIPART:
        inputs = await _multipart_inputs(body, content_type or "")
        return inputs, len(inputs) > 1
    return [ImageInput("image", body)], False


# --- options --------------------------------------------------------------------------------------


def parse_custom_attributes(header: str | None, default_top_k: int) -> RequestOptions:
    """`top_k=3, explain=gradcam, request_id=abc` (commas or semicolons between pairs)."""
    pairs: dict[str, str] = {}
    for part in re.split(r"[;,]", header or ""):
        key, sep, value = part.partition("=")
        if sep:
            pairs[key.strip().lower()] = value.strip()
    top_k = default_top_k
    if "top_k" in pairs:
        if not pairs["top_k"].isdigit() or not 1 <= int(pairs["top_k"]) <= _MAX_TOP_K:
            raise BadRequestError(
                f"custom attribute top_k={pairs['top_k']!r}: use 1 to {_MAX_TOP_K}"
            )
        top_k = int(pairs["top_k"])
    explain = pairs.get("explain", "").lower()
    if explain not in ("", "gradcam", "none"):
        raise BadRequestError(
            f"custom attribute explain={explain!r}: the only explanation is gradcam"
        )
    request_id = pairs.get("request_id") or pairs.get("id")
    return RequestOptions(top_k=top_k, explain=explain == "gradcam", request_id=request_id)


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
        f"Accept {accept!r} names no type this server writes; ask for {' or '.join(WRITABLE_TYPES)}"
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
