"""A multi-model endpoint (SAGEMAKER_MULTI_MODEL=true): the real `serve` process driven through
the `/models` API of SageMaker's contract, with two different trained models."""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from container.invocations import TARGET_MODEL
from container.sagemaker_env import OptMl
from container.sample_data import SampleSpec, make_dataset
from container.serving.settings import MiB
from tests.conftest import FAST, NewJob
from tests.serving.conftest import Server, _rss, jpeg, photo, serving

pytestmark = pytest.mark.long  # tests/conftest.py hands it out early

MULTI = {
    "SAGEMAKER_MULTI_MODEL": "true",
    # one precision to build, not three to time: the subject is the models' life, not their speed
    "SERVE_PRECISION": "fp32",
    "SERVE_MAX_BATCH_SIZE": "4",
}


@pytest.fixture(scope="module")
def other(jobs: NewJob, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model: 2 classes of its own names (the `trained` model has 4)."""
    data = make_dataset(tmp_path_factory.mktemp("other-data"), SampleSpec(classes=2, seed=3))
    for split in ("train", "valid", "test"):
        for folder in list((data / split).iterdir()):
            folder.rename(folder.with_name(f"other-{folder.name}"))
    job = jobs("other-model", FAST, data=data)
    assert job.run().returncode == 0
    return job.opt_ml.model_dir


def _tarball(model_dir: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return target


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory, trained: OptMl) -> Iterator[Server]:
    """A multi-model server whose /opt/ml/model holds a model.tar.gz as the SDK's local mode
    leaves it (for the target-model header on /invocations); nothing is loaded at start."""
    base = tmp_path_factory.mktemp("multi")
    (base / "model").mkdir()
    _tarball(trained.model_dir, base / "model" / "dogs.tar.gz")
    with serving(base, base / "serve.log", MULTI) as running:
        yield running


def _load(server: Server, name: str, url: Path) -> httpx.Response:
    return server.client.post("/models", json={"model_name": name, "url": str(url)})


def _labels(response: httpx.Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {p["label"] for p in response.json()["predictions"]}


def _invoke(server: Server, name: str) -> httpx.Response:
    return server.client.post(
        f"/models/{name}/invoke",
        content=jpeg(photo()),
        headers={"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=9"},
    )


@pytest.fixture
def loaded(endpoint: Server, trained: OptMl, other: Path) -> Iterator[Server]:
    """The endpoint with `trained` loaded as "four" and `other` as "two"; unloaded after."""
    for name, url in (("four", trained.model_dir), ("two", other)):
        assert _load(endpoint, name, url).status_code == 200
    yield endpoint
    for name in ("four", "two"):
        endpoint.client.delete(f"/models/{name}")


def test_nothing_is_loaded_at_start_and_ping_says_200(endpoint: Server) -> None:
    assert endpoint.client.get("/ping").status_code == 200
    assert endpoint.client.get("/models").json() == {"models": []}


def test_each_model_answers_with_its_own_classes(loaded: Server, trained: OptMl) -> None:
    four, two = _labels(_invoke(loaded, "four")), _labels(_invoke(loaded, "two"))
    assert len(four) == 4
    assert len(two) == 2
    assert all(label.startswith("other-") for label in two)
    assert not four & two
    described = loaded.client.get("/models/four").json()
    assert described["modelName"] == "four"
    assert described["modelUrl"] == str(trained.model_dir)
    assert described["classes"] == 4
    assert described["memoryMB"] > 0
    # what SageMaker sends along: logged with the request
    response = loaded.client.post(
        "/models/two/invoke",
        content=jpeg(photo()),
        headers={"Content-Type": "image/jpeg", TARGET_MODEL: "customers/two.tar.gz"},
    )
    assert response.status_code == 200
    assert loaded.log_lines(r"model_name=two target=customers/two\.tar\.gz")


def test_the_invoke_route_takes_what_invocations_takes(loaded: Server) -> None:
    wrong = loaded.client.post(
        "/models/two/invoke", content=b"{}", headers={"Content-Type": "text/csv"}
    )
    assert wrong.status_code == 415
    assert "Content-Type 'text/csv' is not supported" in wrong.json()["message"]
    refused = loaded.client.post(
        "/models/two/invoke",
        content=jpeg(photo()),
        headers={"Content-Type": "image/jpeg", "Accept": "text/html"},
    )
    assert refused.status_code == 406
    asked = loaded.client.post(
        "/models/two/invoke",
        content=jpeg(photo()),
        headers={
            "Content-Type": "image/jpeg",
            "X-Amzn-SageMaker-Custom-Attributes": "top_k=1, request_id=abc",
        },
    )
    assert len(asked.json()["predictions"]) == 1
    assert asked.headers["X-Amzn-SageMaker-Custom-Attributes"] == "request_id=abc"


def test_a_second_load_of_a_name_is_409_and_unknown_names_are_404(
    loaded: Server, other: Path, tmp_path: Path
) -> None:
    again = _load(loaded, "two", other)
    assert again.status_code == 409
    assert "already loaded" in again.json()["message"]
    for response in (
        loaded.client.get("/models/none"),
        loaded.client.delete("/models/none"),
        _invoke(loaded, "none"),
    ):
        assert response.status_code == 404
        assert "model 'none' is not loaded" in response.json()["message"]
    missing = _load(loaded, "missing", tmp_path / "nothing-here")
    assert missing.status_code == 404
    assert "nothing at" in missing.json()["message"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"not json", "the body is not JSON"),
        (b'{"url": "/opt/ml/models/a/model"}', "model_name must be"),
        (b'{"model_name": "a", "url": "models/a"}', "url must be the absolute path"),
    ],
)
def test_a_bad_load_request_is_400(endpoint: Server, body: bytes, words: str) -> None:
    response = endpoint.client.post("/models", content=body)
    assert response.status_code == 400
    assert words in response.json()["message"]


def test_a_broken_model_is_400_and_the_others_go_on(loaded: Server, tmp_path: Path) -> None:
    broken = tmp_path / "broken" / "model.tar.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b" + b"not a gzip stream" * 10)
    response = _load(loaded, "broken", broken.parent)
    assert response.status_code == 400
    assert response.json()["message"].startswith("model 'broken' cannot be loaded:")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _load(loaded, "empty", empty).status_code == 400
    assert loaded.client.get("/models/broken").status_code == 404
    assert len(_labels(_invoke(loaded, "two"))) == 2
    assert loaded.client.get("/ping").status_code == 200


def test_models_are_listed_a_page_at_a_time(loaded: Server, other: Path) -> None:
    assert _load(loaded, "three", other).status_code == 200
    try:
        first = loaded.client.get("/models", params={"limit": 2}).json()
        assert [m["modelName"] for m in first["models"]] == ["four", "three"]
        rest = loaded.client.get(
            "/models", params={"limit": 2, "next_page_token": first["nextPageToken"]}
        ).json()
        assert [m["modelName"] for m in rest["models"]] == ["two"]
        assert "nextPageToken" not in rest
        everything = loaded.client.get("/models").json()
        assert [m["modelName"] for m in everything["models"]] == ["four", "three", "two"]
        assert everything["models"][2]["modelUrl"] == str(other)
        assert loaded.client.get("/models", params={"limit": 0}).status_code == 400
    finally:
        loaded.client.delete("/models/three")


def test_ping_and_the_other_models_answer_while_a_model_loads(
    loaded: Server, trained: OptMl
) -> None:
    done = threading.Event()
    answered_meanwhile: list[tuple[str, int]] = []

    def load() -> httpx.Response:
        try:
            return _load(loaded, "later", trained.model_dir)
        finally:
            done.set()

    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load)
        while not done.is_set():
            ping = loaded.client.get("/ping").status_code
            invoked = _invoke(loaded, "two").status_code
            if not done.is_set():
                answered_meanwhile += [("ping", ping), ("two", invoked)]
        assert loading.result().status_code == 200
    loaded.client.delete("/models/later")
    assert answered_meanwhile
    assert set(answered_meanwhile) == {("ping", 200), ("two", 200)}


def test_requests_to_two_models_at_once_are_all_served(loaded: Server) -> None:
    names = ["four", "two"] * 12
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda name: _labels(_invoke(loaded, name)), names))
    for name, labels in zip(names, answers, strict=True):
        assert len(labels) == (4 if name == "four" else 2)


def test_a_busy_model_does_not_starve_another(loaded: Server) -> None:
    """Forty requests to one model in flight, then two to another: each model's batches take
    turns on the model thread, so the quiet model's answers come long before the busy one's
    queue is through."""
    finished: list[str] = []

    def send(name: str) -> int:
        status = _invoke(loaded, name).status_code
        finished.append(name)  # list.append is atomic
        return status

    with ThreadPoolExecutor(8) as busy, ThreadPoolExecutor(2) as quiet:
        flood = [busy.submit(send, "four") for _ in range(40)]
        few = [quiet.submit(send, "two") for _ in range(2)]
        assert {f.result() for f in flood + few} == {200}
    last_quiet = max(i for i, name in enumerate(finished) if name == "two")
    assert last_quiet < len(finished) - 10, finished


def test_invocations_serves_the_model_the_target_header_names(endpoint: Server) -> None:
    """The SDK's local mode: the tarballs under /opt/ml/model, the target-model header on
    /invocations; the model is loaded on first use."""
    try:
        first = endpoint.post(jpeg(photo()), **{TARGET_MODEL: "dogs.tar.gz"})
        assert len(first.json()["predictions"]) == 4
        assert endpoint.client.get("/models/dogs.tar.gz").status_code == 200
        unnamed = endpoint.post(jpeg(photo()))
        assert unnamed.status_code == 400
        assert TARGET_MODEL in unnamed.json()["message"]
        for outside in ("../serve.log", ".", "/etc/passwd"):
            refused = endpoint.post(jpeg(photo()), **{TARGET_MODEL: outside})
            assert refused.status_code == 404, outside
    finally:
        endpoint.client.delete("/models/dogs.tar.gz")


def test_a_model_over_the_memory_budget_is_507_until_another_is_unloaded(
    tmp_path: Path, trained: OptMl
) -> None:
    """With a budget that holds a few models, loads go on until one is refused with 507 (and
    not kept); unloading gives memory back, and the refused load then succeeds."""
    (tmp_path / "model").mkdir()
    env = {**MULTI, "SERVE_MODELS_MEMORY_MB": "300"}
    with serving(tmp_path, tmp_path / "serve.log", env) as server:
        loaded: list[str] = []
        refused = None
        for n in range(12):
            response = _load(server, f"m{n}", trained.model_dir)
            if response.status_code == 507:
                refused = response
                break
            assert response.status_code == 200, response.text
            loaded.append(f"m{n}")
        assert refused is not None, f"{len(loaded)} models fit in 300 MiB"
        assert loaded, "not even one model fits in 300 MiB"
        assert "SERVE_MODELS_MEMORY_MB" in refused.json()["message"]
        listed = [m["modelName"] for m in server.client.get("/models").json()["models"]]
        assert listed == sorted(loaded)
        before = _rss(server.process.pid)
        unloaded = server.client.delete(f"/models/{loaded[-1]}")
        assert unloaded.status_code == 200
        assert _rss(server.process.pid) < before - unloaded.json()["memoryMB"] * MiB / 2
        for name in loaded[:-1]:  # room for the refused model, whatever the allocator kept
            assert server.client.delete(f"/models/{name}").status_code == 200
        assert _load(server, f"m{len(loaded)}", trained.model_dir).status_code == 200
        assert server.client.delete(f"/models/m{len(loaded)}").status_code == 200
        # loading and unloading again and again leaves nothing behind (traced TorchScript would)
        after = _rss(server.process.pid)
        for _ in range(3):
            assert _load(server, "again", trained.model_dir).status_code == 200
            assert server.client.delete("/models/again").status_code == 200
        assert _rss(server.process.pid) < after + 32 * MiB
        assert "eager, BatchNorm fused fp32 on cpu" in server.logs()
