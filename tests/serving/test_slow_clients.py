"""Slow clients against the real `serve`: header deadline (SERVE_HEADER_TIMEOUT_S) and uvicorn's
concurrency limit (SERVE_MAX_CONNECTIONS)."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from container.sagemaker_env import OptMl
from tests.serving.conftest import QUICK_ENV, Server, jpeg, photo, serving

pytestmark = pytest.mark.long  # tests/conftest.py hands it out early

HEADER_TIMEOUT_S = 1.0
# Generous: these only bound a test that would otherwise hang, they measure nothing.
PATIENCE_S = 20.0
PARTIAL_REQUEST = b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Slow: "


@pytest.fixture(scope="module")
def server(trained: OptMl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that gives clients one second to send their headers."""
    log = tmp_path_factory.mktemp("slow-clients") / "serve.log"
    env = {**QUICK_ENV, "SERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
    with serving(trained.base, log, env) as running:
        yield running


def _connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE_S)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails if it keeps the connection open."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept a slow connection open for {PATIENCE_S} s")
    return received


def _assert_timed_out(answer: bytes) -> None:
    """Nothing, or a 408 with the JSON error, then the end of the connection."""
    if answer:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"] == "request_timeout"


class Slowloris:
    """`count` connections that each send a partial request, then one header byte every
    `interval` seconds; each one the server closes is counted and replaced."""

    def __init__(self, server: Server, count: int, interval: float = 0.3) -> None:
        self.server = server
        self.interval = interval
        self.answers: list[bytes] = []  # what the server sent on each connection it closed
        self._sockets = [self._open() for _ in range(count)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Slowloris:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()

    def wait_for_closes(self, count: int) -> None:
        deadline = time.monotonic() + PATIENCE_S
        while len(self.answers) < count:
            assert time.monotonic() < deadline, f"{len(self.answers)} closes in {PATIENCE_S} s"
            time.sleep(0.1)

    def _open(self) -> socket.socket:
        sock = _connect(self.server)
        sock.sendall(PARTIAL_REQUEST)
        return sock

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            # Readable: the server answered or closed; read before sending, so that a byte sent
            # to a closed socket does not turn its 408 into a reset.
            readable, _, _ = select.select(self._sockets, [], [], 0)
            for sock in self._sockets:
                alive = sock not in readable
                if alive:
                    try:
                        sock.sendall(b"a")
                    except OSError:
                        alive = False
                if not alive:
                    self._replace(sock)

    def _replace(self, sock: socket.socket) -> None:
        try:
            answer = _read_until_closed(sock)
        except ConnectionResetError:
            answer = b""
        sock.close()
        self.answers.append(answer)
        self._sockets[self._sockets.index(sock)] = self._open()


def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    with _connect(server) as sock:
        assert _read_until_closed(sock) == b""


def test_a_partial_request_gets_408_then_the_connection_closes(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    _assert_timed_out(answer)


def test_the_deadline_is_for_all_the_headers_not_each_byte(server: Server) -> None:
    with Slowloris(server, count=1) as attack:
        attack.wait_for_closes(1)
    _assert_timed_out(attack.answers[0])


def test_requests_are_served_while_slow_clients_keep_sockets_open(server: Server) -> None:
    image = jpeg(photo())
    with Slowloris(server, count=20) as attack:
        for _ in range(3):
            assert server.client.get("/ping").status_code == 200
            response = server.post(image)
            assert response.status_code == 200, response.text
        attack.wait_for_closes(20)
    for answer in attack.answers:
        _assert_timed_out(answer)


def test_an_idle_keep_alive_connection_outlives_the_header_timeout(server: Server) -> None:
    """Between requests the keep-alive timeout (75 s) governs, not the header timeout."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=PATIENCE_S)
    image = jpeg(photo())
    first_socket = None
    try:
        for _ in range(2):
            connection.request("GET", "/ping")
            ping = connection.getresponse()
            assert (ping.status, ping.read()) == (200, b"")
            first_socket = first_socket or connection.sock
            time.sleep(HEADER_TIMEOUT_S * 1.5)
            connection.request("POST", "/invocations", image, {"Content-Type": "image/jpeg"})
            invocation = connection.getresponse()
            assert invocation.status == 200, invocation.read()
            invocation.read()
            assert connection.sock is first_socket  # one connection throughout
            time.sleep(HEADER_TIMEOUT_S * 1.5)
    finally:
        connection.close()


def test_over_the_connection_limit_uvicorn_answers_503_at_once(
    trained: OptMl, tmp_path: Path
) -> None:
    env = {**QUICK_ENV, "SERVE_MAX_CONNECTIONS": "2"}
    with serving(trained.base, tmp_path / "serve.log", env) as limited:
        slow_bodies = [_connect(limited) for _ in range(3)]
        for sock in slow_bodies:
            sock.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 100000\r\n\r\n\xff\xd8"
            )
        response = httpx.get(f"{limited.url}/ping", timeout=5)
        assert response.status_code == 503
        assert response.text == "Service Unavailable"
        for sock in slow_bodies:
            sock.close()
        limited.wait_until(200)


def test_worker_processes_have_the_header_deadline_too(trained: OptMl, tmp_path: Path) -> None:
    """`workers > 1` sends uvicorn's config, protocol included, to spawned processes."""
    env = {
        **QUICK_ENV,
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        "SERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }
    with serving(trained.base, tmp_path / "serve.log", env) as workers:
        for _ in range(4):
            with _connect(workers) as sock:
                sock.sendall(PARTIAL_REQUEST)
                assert _read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
