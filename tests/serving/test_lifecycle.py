"""Start-up, health, load and shutdown: of the real `serve` process where the process is the
subject (its socket, SIGTERM, exit codes), else of the app in this process (`in_process`)."""

from __future__ import annotations

import os
import shutil
import tarfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from container.sagemaker_env import OptMl
from tests import forkserver
from tests.serving.conftest import (
    QUICK,
    SERVE,
    Server,
    in_process,
    jpeg,
    photo,
    serve_settings,
    start_server,
)

pytestmark = pytest.mark.long  # tests/conftest.py hands it out early

# SageMaker's health check times out after 2 s, and SIGKILL follows SIGTERM after 30 s.
PING_TIMEOUT_S = 2.0
STOP_WINDOW_S = 30


def _tree(tmp_path: Path, trained: OptMl) -> Path:
    """A private /opt/ml whose model/ is to be arranged by the test."""
    base = tmp_path / "opt_ml"
    (base / "model").mkdir(parents=True)
    (base / "input").symlink_to(trained.base / "input")
    return base


def _files(trained: OptMl) -> list[Path]:
    return sorted(trained.model_dir.iterdir())


def _pings_until_200(server: Server) -> list[int]:
    """The statuses of /ping from the first answer to the first 200 (a 503 says it is loading)."""
    statuses: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and 200 not in statuses:
        try:
            response = server.client.get("/ping")
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.json()["error"] == "not_ready"
            assert response.json()["message"] == "the model is still loading"
    return statuses


def _ping_times_while_saturated(server: Server) -> list[float]:
    """Seconds of each of 10 pings while 32 clients keep the model busy with 1024x768 photos."""
    body = jpeg(photo(1024, 768))
    stop = threading.Event()
    served = []

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                response = client.post(
                    "/invocations", content=body, headers={"Content-Type": "image/jpeg"}
                )
                served.append(response.status_code)

    with ThreadPoolExecutor(32) as pool:
        for _ in range(32):
            pool.submit(hammer)
        time.sleep(3)  # let the queue fill
        pings = []
        with httpx.Client(base_url=server.url, timeout=PING_TIMEOUT_S * 5) as client:
            for _ in range(10):
                started = time.monotonic()
                assert client.get("/ping").status_code == 200
                pings.append(time.monotonic() - started)
                time.sleep(0.2)
        stop.set()
    assert served
    assert set(served) == {200}
    return pings


def _in_flight(
    pool: ThreadPoolExecutor, server: Server, body: bytes, count: int
) -> list[Future[httpx.Response]]:
    """`count` requests posted at once, returned once every one has sent its headers and the
    server has had a moment to take them in: each has its connection, none its answer yet."""
    sent = threading.Semaphore(0)

    def trace(event: str, info: object) -> None:
        if event == "http11.send_request_headers.complete":
            sent.release()

    def post() -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post(
                "/invocations",
                content=body,
                headers={"Content-Type": "image/jpeg"},
                extensions={"trace": trace},
            )

    requests = [pool.submit(post) for _ in range(count)]
    for _ in range(count):  # a thread of a loaded host can take seconds to start
        assert sent.acquire(timeout=60), [r.exception() for r in requests if r.done()]
    time.sleep(0.5)  # uvicorn accepts the connections and starts reading the bodies
    return requests


def test_the_serve_process_from_start_to_sigterm(trained: OptMl, tmp_path: Path) -> None:
    """The real `serve`: its socket opens before the model has loaded (503 says so, then 200);
    /ping stays fast while inference is saturated; SIGTERM finishes the requests in flight, and
    it exits 0."""
    log, env = tmp_path / "serve.log", {"SERVE_MAX_BATCH_SIZE": "2"}
    server = start_server(trained.base, log, env, fork=False)
    try:
        statuses = _pings_until_200(server)
        assert statuses[0] == 503  # the socket opens before the model has loaded
        assert statuses[-1] == 200
        assert set(statuses) == {503, 200}
        assert server.client.get("/ping").content == b""
        pings = _ping_times_while_saturated(server)
        assert max(pings) < PING_TIMEOUT_S, pings
        with ThreadPoolExecutor(12) as pool:
            in_flight = _in_flight(pool, server, jpeg(photo(3000, 2000)), 12)
            sent = time.monotonic()
            assert server.stop(timeout=STOP_WINDOW_S) == 0
            assert time.monotonic() - sent < STOP_WINDOW_S
            responses = [f.result() for f in in_flight]
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * 12
    assert "Settings: SAGEMAKER_BASE_DIR=" in server.logs()  # what it was told, at start-up
    assert "SERVE_MAX_BATCH_SIZE=2," in server.logs()
    assert "Shut down on SIGTERM" in server.logs()


@pytest.mark.parametrize("layout", ["nested", "model.tar.gz", "nested model.tar.gz"])
def test_model_layouts(trained: OptMl, tmp_path: Path, layout: str) -> None:
    base = _tree(tmp_path, trained)
    model = base / "model"
    if layout == "nested":
        shutil.copytree(trained.model_dir, model / "my-model")
    else:
        with tarfile.open(model / "model.tar.gz", "w:gz") as tf:
            for file in _files(trained):
                arcname = f"inner/{file.name}" if layout.startswith("nested") else file.name
                tf.add(file, arcname=arcname)
    with in_process(serve_settings(OptMl(base), **QUICK)) as app:
        app.wait_until(200)
        assert app.post(jpeg(photo())).status_code == 200


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("empty", "no model in"),
        ("no weights", "has no model.pt"),
        ("corrupt weights", "model.pt does not load"),
        ("corrupt archive", "cannot unpack"),
    ],
)
def test_a_broken_model_means_503_for_good_with_the_reason_in_the_log(
    trained: OptMl, tmp_path: Path, breakage: str, reason: str
) -> None:
    base = _tree(tmp_path, trained)
    model = base / "model"
    if breakage == "corrupt archive":
        (model / "model.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    elif breakage != "empty":
        for file in _files(trained):
            shutil.copy(file, model / file.name)
        if breakage == "no weights":
            (model / "model.pt").unlink()
        else:
            (model / "model.pt").write_bytes(b"garbage")
    with in_process(serve_settings(OptMl(base))) as app:
        (line,) = app.log_lines("Not serving")
        assert line.startswith("ERROR ")
        assert reason in line  # one line a person can act on
        # Clients are told that it failed; what was found (paths, a listing) only goes to the log.
        public = "the model artifact cannot be loaded; the server log says why"
        for _ in range(3):
            response = app.client.get("/ping")
            assert response.status_code == 503
            assert response.json()["message"] == public
        invocation = app.post(jpeg(photo()))
        assert invocation.status_code == 503
        assert invocation.json()["message"] == public
        assert len(app.log_lines("Not serving")) == 1


def test_stopped_while_its_decoders_start_it_leaves_no_decoder_running(
    trained: OptMl, tmp_path: Path
) -> None:
    """An empty model folder fails at once, and the stop comes while the decoder processes are
    still importing: each one started is stopped, and reaped, before the app's shutdown ends
    (ten times: the stop lands at a different point of their start each time)."""
    base = _tree(tmp_path, trained)
    before = set(psutil.Process().children())
    for _ in range(10):
        with in_process(serve_settings(OptMl(base))) as app:
            assert app.log_lines("Not serving")
        assert set(psutil.Process().children()) - before == set()


def test_default_accept_can_be_jsonlines(trained: OptMl) -> None:
    accept = "application/jsonlines"
    with in_process(serve_settings(trained, default_accept=accept, **QUICK)) as app:
        app.wait_until(200)
        response = app.post(jpeg(photo()), accept="*/*")
        assert response.headers["content-type"] == "application/jsonlines"


def test_settings_it_cannot_honour_stop_it_at_once(trained: OptMl) -> None:
    """Exit 2 with the reason before anything starts; which values are refused, and the message
    for each, is test_codecs.py's (`test_bad_settings_name_the_variable` and the next)."""
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(trained.base), "SERVE_DEVICE": "gpu"}
    returncode, _, stderr = forkserver.FORKSERVER.run([str(SERVE)], env, Path.cwd(), timeout=60)
    assert returncode == 2
    assert "SERVE_DEVICE='gpu' is invalid: Input should be 'auto', 'cuda'" in stderr
