"""Property-based fuzzing: random and mutated bodies never crash the server or get a 500."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from container.images import ImageDecodeError, decode
from container.serving.codecs import READABLE_TYPES, ImageInput, read_inputs
from container.serving.errors import ServingError
from tests.serving.conftest import Server

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


def _read(content_type: str, body: bytes) -> list[ImageInput] | ServingError:
    try:
        return asyncio.run(read_inputs(content_type, body))[0]
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
            assert inputs.status in (400, 415)
            assert inputs.message
            return
        for item in inputs:
            if item.data is not None:
                with contextlib.suppress(ImageDecodeError):
                    decode(item.data, min_side=128, max_pixels=40_000_000)

    check()


def test_the_server_answers_every_body_with_json_and_never_500(
    server: Server, bodies: st.SearchStrategy[bytes]
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
        response = server.client.post("/invocations", content=body, headers=headers)
        assert response.status_code in (200, 400, 406, 415), response.text
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
    assert server.client.get("/ping").status_code == 200
