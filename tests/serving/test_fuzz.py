"""Property-based fuzzing: random and mutated bodies never crash the server or get a 500."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from container.decoding import ImageDecodeError, decode
from container.serving.budget import RequestBudget
from container.serving.codecs import READABLE_TYPES, ImageInput, read_inputs
from container.serving.errors import BadRequestError, PayloadTooLargeError, ServingError
from container.serving.settings import ENVIRONMENT, ServeSettings
from tests.serving.conftest import App, jpeg, photo

CONTENT_TYPES = [*sorted(READABLE_TYPES), "text/plain", "image/svg+xml", ""]
ACCEPTS = ["*/*", "application/json", "application/jsonlines", "text/html", ""]


def _seeds(test_images: list[Path]) -> list[bytes]:
    """Real images in every container the server reads, to mutate."""
    image = test_images[0].read_bytes()
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    npy = io.BytesIO()
    np.save(npy, pixels)
    b64 = base64.b64encode(image).decode()
    return [
        image,
        test_images[-1].read_bytes(),
        npy.getvalue(),
        json.dumps({"instances": [b64]}).encode(),
        (json.dumps({"b64": b64}) + "\n").encode(),
    ]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position : position + draw(st.integers(1, 64))]
    return bytes(data)


def _bodies(test_images: list[Path]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=4096), mutated(_seeds(test_images)))


@pytest.fixture(scope="module")
def bodies(test_images: list[Path]) -> st.SearchStrategy[bytes]:
    return _bodies(test_images)


DEFAULT_BUDGET = RequestBudget.from_settings(ServeSettings.from_environ({}))


def _read(
    content_type: str, body: bytes, budget: RequestBudget = DEFAULT_BUDGET
) -> list[ImageInput] | ServingError:
    try:
        return asyncio.run(read_inputs(content_type, body, budget))[0]
    except ServingError as exc:
        return exc


def test_codecs_and_decoding_fail_only_with_their_own_errors(
    bodies: st.SearchStrategy[bytes],
) -> None:
    @settings(max_examples=400, deadline=None, database=None)
    @given(content_type=st.sampled_from(CONTENT_TYPES), body=bodies)
    def check(content_type: str, body: bytes) -> None:
        inputs = _read(content_type, body)
        if isinstance(inputs, ServingError):
            assert inputs.status in (400, 413, 415)
            assert inputs.message
            return
        for item in inputs:
            if item.data is not None:
                with contextlib.suppress(ImageDecodeError):
                    decode(item.data, min_side=128)  # the default DecodeLimits: 40 MP

    check()


def test_the_server_answers_every_body_with_json_and_never_500(
    app: App, bodies: st.SearchStrategy[bytes]
) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        content_type=st.sampled_from(CONTENT_TYPES),
        accept=st.sampled_from(ACCEPTS),
        body=bodies,
    )
    def check(content_type: str, accept: str, body: bytes) -> None:
        headers = {"Content-Type": content_type, "Accept": accept}
        response = app.client.post("/invocations", content=body, headers=headers)
        assert response.status_code in (200, 400, 406, 413, 415), response.text
        document = (
            response.json() if response.headers["content-type"] == "application/json" else None
        )
        if response.status_code != 200:
            assert document is not None
            assert set(document) == {"error", "message"}
        elif document is None:
            lines = [json.loads(line) for line in response.text.splitlines()]
            assert all("predictions" in line for line in lines)
        else:
            assert "predictions" in document or "results" in document

    check()
    assert app.client.get("/ping").status_code == 200


# --- the request budget ---------------------------------------------------------------------------

SMALL = RequestBudget(max_images=4, max_image_pixels=24, max_request_pixels=40)
"""Small enough that random examples go over each limit, and stay cheap."""
SIDES = st.sampled_from(range(1, 11))  # evenly: integers() favours the ends of its range


@dataclass(frozen=True)
class Batch:
    """A body of `count` images and what reading it must give: the images, or the limit it is
    over (None: within the budget)."""

    content_type: str
    body: bytes
    count: int
    data: list[bytes] | None  # the encoded images, in order; None for .npy
    sides: tuple[int, int]  # (H, W) of each .npy image
    over: str | None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _multipart_body(parts: list[tuple[str, bytes | None]], boundary: str) -> bytes:
    """(name, data) parts: a file part each, or a plain field where data is None."""
    chunks = []
    for name, data in parts:
        filename = "" if data is None else f'; filename="{name}"'
        disposition = f'Content-Disposition: form-data; name="{name}"{filename}'
        chunks.append(
            f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
            + (b"option" if data is None else data)
            + b"\r\n"
        )
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


@st.composite
def batches(draw: st.DrawFn, budget: RequestBudget) -> Batch:
    """JSON, JSON Lines, multipart or .npy bodies of 0 to twice `budget.max_images` images."""
    count = draw(st.integers(0, 2 * budget.max_images))
    over_count = "max_images" if count > budget.max_images else None
    kind = draw(st.sampled_from(["json", "jsonlines", "multipart", "npy"]))
    if kind == "npy":
        height, width = draw(SIDES), draw(SIDES)
        channels = draw(st.sampled_from([1, 3, 4]))
        single = count == 1 and draw(st.booleans())
        shape = (height, width, channels) if single else (count, height, width, channels)
        if width not in (1, 3, 4) and draw(st.booleans()):  # channels first, unambiguously
            shape = (*shape[:-3], channels, height, width)
        dtype = draw(st.sampled_from([np.uint8, np.float32, np.int16, ">f8"]))
        over = (
            over_count
            or ("max_image_pixels" if height * width > budget.max_image_pixels else None)
            or (
                "max_request_pixels" if count * height * width > budget.max_request_pixels else None
            )
        )
        array = np.ones(shape, dtype)
        return Batch("application/x-npy", _npy_bytes(array), count, None, (height, width), over)
    data = [draw(st.binary(min_size=1, max_size=12)) for _ in range(count)]
    b64 = [base64.b64encode(d).decode() for d in data]
    if kind == "multipart":
        boundary = "hypothesis-boundary-0f3a"
        parts: list[tuple[str, bytes | None]] = [(f"{i}.jpg", d) for i, d in enumerate(data)]
        for _ in range(draw(st.integers(0, 2))):  # plain fields, which carry no image
            parts.insert(draw(st.integers(0, len(parts))), ("top_k", None))
        content_type = f"multipart/form-data; boundary={boundary}"
        return Batch(
            content_type, _multipart_body(parts, boundary), count, data, (0, 0), over_count
        )
    items = [{"b64": item} if draw(st.booleans()) else item for item in b64]
    if kind == "jsonlines":
        lines = [json.dumps(item if isinstance(item, dict) else {"b64": item}) for item in items]
        for _ in range(draw(st.integers(0, 2))):
            lines.insert(draw(st.integers(0, len(lines))), "  ")
        body = "\n".join(lines).encode()
        return Batch("application/jsonlines", body, count, data, (0, 0), over_count)
    wrapper = draw(st.sampled_from(["list", "instances", "images"]))
    document = items if wrapper == "list" else {wrapper: items}
    return Batch("application/json", json.dumps(document).encode(), count, data, (0, 0), over_count)


def test_read_inputs_returns_the_images_within_the_budget_and_refuses_the_rest() -> None:
    @settings(max_examples=300, deadline=None, database=None)
    @given(batch=batches(SMALL))
    def check(batch: Batch) -> None:
        result = _read(batch.content_type, batch.body, SMALL)
        if batch.count == 0:
            assert isinstance(result, BadRequestError), result
        elif batch.over is not None:
            assert isinstance(result, PayloadTooLargeError), result
            assert result.message.endswith(f"({ENVIRONMENT[batch.over]})"), result.message
        elif batch.data is not None:
            assert isinstance(result, list), result
            assert [item.data for item in result] == batch.data
        else:
            assert isinstance(result, list), result
            assert len(result) == batch.count
            for item in result:
                assert item.pixels is not None
                assert item.pixels.shape == (*batch.sides, 3)

    check()


@st.composite
def server_batches(draw: st.DrawFn, max_images: int) -> tuple[str, bytes, int]:
    """Bodies of 0 to twice `max_images` small, real images: (content type, body, count)."""
    count = draw(st.integers(0, 2 * max_images))
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    kind = draw(st.sampled_from(["json", "jsonlines", "multipart", "npy"]))
    if kind == "npy":
        pixels = np.asarray(photo(width, height, seed=count))
        return "application/x-npy", _npy_bytes(np.repeat(pixels[None], count, axis=0)), count
    image = jpeg(photo(width, height, seed=count))
    b64 = base64.b64encode(image).decode()
    if kind == "multipart":
        boundary = "hypothesis-boundary-0f3a"
        body = _multipart_body([(f"{i}.jpg", image) for i in range(count)], boundary)
        return f"multipart/form-data; boundary={boundary}", body, count
    if kind == "jsonlines":
        body = "".join(json.dumps({"b64": b64}) + "\n" for _ in range(count)).encode()
        return "application/jsonlines", body, count
    return "application/json", json.dumps({"instances": [b64] * count}).encode(), count


def test_the_server_answers_every_count_with_its_results_or_413(app: App) -> None:
    """Needs app.py to pass its RequestBudget (SERVE_MAX_IMAGES, default 64) to read_inputs."""
    max_images = RequestBudget.from_settings(ServeSettings.from_environ({})).max_images

    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=server_batches(max_images))
    def check(batch: tuple[str, bytes, int]) -> None:
        content_type, body, count = batch
        response = app.post(body, content_type)
        assert response.headers["content-type"] == "application/json", response.text
        document = response.json()
        if count == 0:
            assert response.status_code == 400, response.text
        elif count > max_images:
            assert response.status_code == 413, response.text
            assert document["message"].endswith("(SERVE_MAX_IMAGES)")
        else:
            assert response.status_code == 200, response.text
            assert len(document.get("results", [document])) == count

    check()
    assert app.client.get("/ping").status_code == 200
