"""Hostile and overloading clients: against the real server process where its sockets or its
memory are the subject, else against the app in this process (`in_process`).

Each hostile request gets its 4xx with a message naming the limit (never a 500, a repr or a path);
meanwhile and afterwards `/ping` answers 200 within 2 s, and the server's memory (with its
decoder processes, from /proc) grows by less than `MEMORY_BOUND`. A decoder wedged by an image
is replaced while other clients are answered; more clients than the queue holds get fast 503s.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
from PIL import Image

from container.sagemaker_env import OptMl
from tests.crafted import png_header
from tests.serving.conftest import (
    QUICK,
    QUICK_ENV,
    Endpoint,
    Server,
    encoded,
    in_process,
    jpeg,
    photo,
    serve_settings,
    serving,
)

pytestmark = pytest.mark.long  # tests/conftest.py hands it out early

MiB = 1 << 20
MEMORY_BOUND = 150 * MiB
"""How much the server and its decoders may grow over one class of hostile requests."""
PING_LIMIT_S = 2.0
LEAKS = re.compile(r"0x[0-9a-f]{6,}|<_io|/tmp/|pytest-of-|/opt/ml|Traceback")
"""What a client-visible message must never hold: heap addresses, reprs, paths, tracebacks."""


def _npy(shape: tuple[int, ...], data: bytes) -> bytes:
    """A .npy file whose header declares `shape` (uint8) followed by `data`."""
    header = repr({"descr": "|u1", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def _b64_list(images: list[bytes]) -> bytes:
    return json.dumps([base64.b64encode(i).decode() for i in images]).encode()


def _slow_jpeg() -> bytes:
    """A small JPEG behind 5.6 MB of empty APP0 segments: Pillow walks its markers in Python,
    about 2 s on these machines, far beyond the 0.2 s budget the test gives a decode."""
    small = jpeg(Image.new("RGB", (64, 64), (10, 200, 30)))
    return small[:2] + b"\xff\xe0\x00\x02" * 1_400_000 + small[2:]


TINY = encoded(Image.new("RGB", (8, 8), (90, 120, 60)), "PNG")


@dataclass(frozen=True)
class Hostile:
    body: Callable[[], bytes]
    content_type: str
    status: int
    words: str
    headers: tuple[tuple[str, bytes], ...] = ()


HOSTILE = {
    "65 images in a JSON list": Hostile(
        lambda: _b64_list([TINY] * 65), "application/json", 413, "SERVE_MAX_IMAGES"
    ),
    "100k JSON lines": Hostile(
        lambda: b'{"b64": "AAAA"}\n' * 100_000, "application/jsonlines", 413, "SERVE_MAX_IMAGES"
    ),
    "an npy batch of 100k images": Hostile(
        lambda: _npy((100_000, 1, 1, 1), b"\x00" * 100_000),
        "application/x-npy",
        413,
        "SERVE_MAX_IMAGES",
    ),
    "an npy header asking for terabytes": Hostile(
        lambda: _npy((1_000_000, 1_000_000, 3), b"\x00" * 16), "application/x-npy", 400, ".npy"
    ),
    "a PNG header claiming 50000x50000": Hostile(
        lambda: png_header(50_000, 50_000), "image/png", 413, "SERVE_MAX_IMAGE_PIXELS"
    ),
    "three 36 MP images in one request": Hostile(
        lambda: _b64_list([encoded(Image.new("1", (6000, 6000)), "PNG")] * 3),
        "application/json",
        413,
        "SERVE_MAX_REQUEST_PIXELS",
    ),
    "deeply nested JSON": Hostile(
        lambda: b"[" * 200_000 + b"]" * 200_000, "application/json", 400, "JSON"
    ),
    "a 5000-digit integer": Hostile(
        lambda: b'{"instances": [' + b"9" * 5000 + b"]}", "application/json", 400, "4300 digits"
    ),
    "top_k in Unicode digits": Hostile(
        lambda: jpeg(photo()),
        "image/jpeg",
        400,
        "top_k",
        (("X-Amzn-SageMaker-Custom-Attributes", "top_k=\u00b2".encode("latin-1")),),
    ),
    "a 10 kB request_id": Hostile(
        lambda: jpeg(photo()),
        "image/jpeg",
        400,
        "request_id",
        (("X-Amzn-SageMaker-Custom-Attributes", b"request_id=" + b"a" * 10_000),),
    ),
    "bytes that are no image": Hostile(
        lambda: b"\x00\x01garbage" * 100, "image/jpeg", 400, "not an image"
    ),
}


@contextmanager
def pinging(server: Endpoint) -> Iterator[list[tuple[int, float]]]:
    """GET /ping every 0.1 s from a thread of its own before, while and after the block runs:
    (status, seconds) of each."""
    pings: list[tuple[int, float]] = []
    stop = threading.Event()

    def ping() -> None:
        started = time.monotonic()
        status = server.client.get("/ping").status_code
        pings.append((status, time.monotonic() - started))

    def run() -> None:
        ping()
        while not stop.wait(0.1):
            ping()

    thread = threading.Thread(target=run)
    thread.start()
    while not pings and thread.is_alive():
        time.sleep(0.01)
    try:
        yield pings
    finally:
        stop.set()
        thread.join()
        ping()


def _while_sending(
    server: Endpoint, body: bytes, count: int, step: Callable[[], None]
) -> list[httpx.Response]:
    """Send `body` `count` times at once and call `step` until all are answered; the answers."""
    with ThreadPoolExecutor(count) as pool:
        sent = [pool.submit(server.post, body) for _ in range(count)]
        while not all(s.done() for s in sent):
            step()
        return [s.result() for s in sent]


def _healthy(pings: list[tuple[int, float]]) -> None:
    assert pings
    assert {status for status, _ in pings} == {200}, pings
    assert max(seconds for _, seconds in pings) < PING_LIMIT_S, pings


@pytest.fixture(scope="module")
def guarded(trained: OptMl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(
        trained.base,
        tmp_path_factory.mktemp("hostile") / "serve.log",
        {**QUICK_ENV, "SERVE_BODY_TIMEOUT_S": "2"},
    ) as running:
        assert running.post(jpeg(photo())).status_code == 200  # every allocation made once
        yield running


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_requests_get_their_4xx_and_harm_no_one(guarded: Server, name: str) -> None:
    hostile = HOSTILE[name]
    body = hostile.body()
    before = guarded.memory()
    with pinging(guarded) as pings:
        for _ in range(3):
            response = guarded.client.post(
                "/invocations",
                content=body,
                headers=[("Content-Type", hostile.content_type.encode()), *hostile.headers],
            )
            assert response.status_code == hostile.status, response.text
            message = response.json()["message"]
            assert hostile.words in message
            assert not LEAKS.search(message), message
        assert guarded.post(jpeg(photo())).status_code == 200
    _healthy(pings)
    assert guarded.memory() - before < MEMORY_BOUND


def test_a_body_that_never_arrives_gets_408(guarded: Server) -> None:
    with socket.create_connection(("127.0.0.1", guarded.port)) as client:
        client.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"\xff" * 100
        )
        client.settimeout(30)
        answer = b""
        while not answer.endswith(b"}") and (chunk := client.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"SERVE_BODY_TIMEOUT_S" in answer


def test_a_client_that_leaves_has_its_work_dropped(guarded: Server) -> None:
    many = _b64_list([jpeg(photo(320, 240, seed)) for seed in range(64)])
    with socket.create_connection(("127.0.0.1", guarded.port)) as client:
        client.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(many)}\r\n\r\n".encode()
            + many
        )
        time.sleep(0.05)  # the body is in and its images are being decoded
    assert guarded.log_lines(r"status=499 .* images=64 ", timeout=30)
    assert guarded.client.get("/ping").status_code == 200


def test_a_wedged_decoder_is_replaced_while_others_are_answered(trained: OptMl) -> None:
    normal = jpeg(photo())
    with in_process(serve_settings(trained, decode_timeout_s=0.2, decoders=2, **QUICK)) as app:
        app.wait_until(200)
        answered: list[int] = []  # statuses of requests sent while the wedges were in
        with pinging(app) as pings:
            refused = _while_sending(
                app, _slow_jpeg(), 3, lambda: answered.append(app.post(normal).status_code)
            )
        for response in refused:
            assert response.status_code == 413, response.text
            assert "SERVE_DECODE_TIMEOUT_S" in response.json()["message"]
        assert answered
        assert set(answered) == {200}
        _healthy(pings)
        assert "Replacing decoder process" in app.logs()


def test_more_clients_than_the_queue_holds_get_fast_503s(trained: OptMl) -> None:
    body = jpeg(photo(1024, 768))
    with in_process(serve_settings(trained, max_queued_images=2, **QUICK)) as app:
        app.wait_until(200)
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda _: app.post(body), range(96)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) == {200, 503}, statuses
        for response in responses:
            if response.status_code == 503:
                assert response.headers["Retry-After"] == "1"
                assert "SERVE_MAX_QUEUED_IMAGES" in response.json()["message"]
        # The queue drains: the server answers at once again.
        assert app.client.get("/ping").status_code == 200
        assert app.post(body).status_code == 200


def test_ping_says_503_while_images_wait_too_long_for_a_decoder(trained: OptMl) -> None:
    # Time enough to decode (the subject is the wait for a decoder, not SERVE_DECODE_TIMEOUT_S).
    served = serve_settings(trained, decoders=1, stall_s=0.5, decode_timeout_s=60, **QUICK)
    with in_process(served) as app:
        app.wait_until(200)
        reasons = []

        def ping() -> None:
            response = app.client.get("/ping")
            if response.status_code == 503:
                reasons.append(response.json()["message"])
            time.sleep(0.05)

        slow_ones = _while_sending(app, _slow_jpeg(), 2, ping)
        assert [s.status_code for s in slow_ones] == [200, 200]
        assert any("waited" in r and "for a decoder" in r for r in reasons), reasons
        app.wait_until(200, timeout=10)
