"""Shared fixtures: a generated dataset, /opt/ml trees around it, and the real `train` process."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from filelock import FileLock, Timeout
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling

from container.sagemaker_env import MAX_FAILURE_CHARS, OptMl, encode_hyperparameters
from container.sample_data import SampleSpec, make_dataset
from container.training.metrics import METRIC_DEFINITIONS
from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train"

# Small and fast: 32 px images, two epochs, no download attempts, no worker processes, no int8
# network (the `trained` model and tests/training/test_quantization.py have theirs).
FAST: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 8,
    "image_size": 32,
    "pretrained": False,
    "workers": 0,
    "warmup_epochs": 0,
    "int8": False,
}


@dataclass
class TrainRun:
    """A finished `train` process."""

    returncode: int
    stdout: str
    stderr: str

    def metric_lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.endswith(";")]

    def metric(self, name: str) -> list[float]:
        """Every value the SageMaker regex for `name` scrapes from the log, in order."""
        regex = next(d["Regex"] for d in METRIC_DEFINITIONS if d["Name"] == name)
        log = self.stdout + self.stderr
        return [float(m) for line in log.splitlines() for m in re.findall(regex, line)[:1]]


@dataclass
class Job:
    """An /opt/ml tree for one training job, and ways to run `train` on it."""

    opt_ml: OptMl

    @property
    def base(self) -> Path:
        return self.opt_ml.base

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, "SAGEMAKER_BASE_DIR": str(self.base), "PYTHONUNBUFFERED": "1"}
        env.pop("SMDEBUG_CONFIG_FILE_PATH", None)
        env["MASTER_PORT"] = str(free_port())
        return {**env, **(extra or {})}

    def write_config(self, name: str, content: Any) -> None:
        path = self.opt_ml.config_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content))

    def set_hyperparameters(self, values: Mapping[str, Any], **changes: Any) -> None:
        """Written as SageMaker writes them: every value a string."""
        merged = {**values, **changes}
        self.write_config("hyperparameters.json", encode_hyperparameters(merged))

    def set_channels(self, *names: str, **specs: Mapping[str, str]) -> None:
        config = {name: {"TrainingInputMode": "File"} for name in names}
        self.write_config("inputdataconfig.json", {**config, **specs})

    def start(
        self, extra_env: Mapping[str, str] | None = None, wrapper: Sequence[str] = ()
    ) -> subprocess.Popen[str]:
        """Start `train`; `wrapper` is a command line that runs it (e.g. in another namespace)."""
        return subprocess.Popen(
            [*wrapper, sys.executable, str(TRAIN)],
            env=self.env(extra_env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.base,
        )

    def run(
        self,
        extra_env: Mapping[str, str] | None = None,
        timeout: float = 300,
        wrapper: Sequence[str] = (),
    ) -> TrainRun:
        """`train` to its end: forked from the worker's forkserver, or under `wrapper` a process
        of its own."""
        if not wrapper:
            return TrainRun(
                *forkserver.FORKSERVER.run([str(TRAIN)], self.env(extra_env), self.base, timeout)
            )
        process = self.start(extra_env, wrapper)
        stdout, stderr = process.communicate(timeout=timeout)
        return TrainRun(process.returncode, stdout, stderr)

    def failure(self) -> str | None:
        path = self.opt_ml.failure_file
        return path.read_text() if path.exists() else None

    def meta(self) -> dict[str, Any]:
        return json.loads((self.opt_ml.model_dir / "model_meta.json").read_text())

    def report(self, name: str) -> dict[str, Any]:
        return json.loads((self.opt_ml.output_data_dir / name).read_text())


def fails_with(job: Job, *words: str, env: dict[str, str] | None = None) -> str:
    """Run `job`: exit 1, a short failure file without a traceback whose first line holds
    `words`, and no model; the first line."""
    run = job.run(env)
    assert run.returncode == 1, run.stderr
    failure = job.failure()
    assert failure is not None, f"no failure file; stderr:\n{run.stderr}"
    assert len(failure) <= MAX_FAILURE_CHARS
    first_line = failure.splitlines()[0]
    for word in words:
        assert word in first_line, first_line
    assert "Traceback" not in failure
    assert not (job.opt_ml.model_dir / "model.pt").exists()
    return first_line


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 120) -> str:
    """Read the process's stderr up to a line containing `text`; return what was read."""
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise AssertionError(f"train exited before printing {text!r}:\n{''.join(seen)}")
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"no {text!r} within {timeout} s")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CONTAINER_TESTS = Path(__file__).resolve().parent / "container"


class _ByModule(LoadScopeScheduling):
    """pytest-xdist's unit of work: a test module, so that its module-scoped fixtures (a training
    run its tests share) run once; tests/container is one unit, as its tests share the docker
    engine, the image's containers and host port 8080. Units are handed out in collection order,
    which `pytest_collection_modifyitems` makes longest first. (`--dist loadgroup` would group
    with markers, but xdist 3.8 cannot suffix pytest 9.2's node ids.)"""

    def __init__(self, config: pytest.Config, log: Producer) -> None:
        config.option.loadscopereorder = False  # xdist's order: most tests first
        super().__init__(config, log)

    def _split_scope(self, nodeid: str) -> str:
        return self.unit(nodeid)

    @staticmethod
    def unit(nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return "tests/container" if module.startswith("tests/container/") else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> _ByModule:
    return _ByModule(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker and every process it starts keep to their share of the
    CPUs (`make test` runs one worker more than the CPUs: one CPU each, in turn round them):
    `train` and `serve` size their torch threads from the CPUs they may use, and two workers whose
    threads shared all of them ran a training job 3x slower than one alone (CPU time lost to
    OpenMP threads waiting on each other). Two single-threaded workers on one CPU take turns."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and count:
        os.sched_setaffinity(0, _cpu_share(int(worker.removeprefix("gw")), int(count)))


def _cpu_share(slot: int, slots: int) -> list[int]:
    """The CPUs of `slot` of `slots` taking this process's CPUs in turn: one each, round them."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[slot % len(cpus) :: slots] or cpus


def pytest_unconfigure(config: pytest.Config) -> None:
    forkserver.FORKSERVER.close()


def pytest_itemcollected(item: pytest.Item) -> None:
    """Markers from what each test needs, so that `make test-fast` can leave out the long ones:
    `docker` (the real image: tests/container), `aws` (the moto server, through the SageMaker SDK
    or boto3), `slow` (training jobs of its own: the `job` or `jobs` fixture, directly or through
    a fixture that shares one run between tests; `fixturenames` holds them all). A test that
    trains by another way (the quick start's demo model) says `@pytest.mark.slow` itself."""
    fixtures = set(getattr(item, "fixturenames", ()))
    if item.path.is_relative_to(_CONTAINER_TESTS):
        item.add_marker(pytest.mark.docker)
    if "moto_server" in fixtures:
        item.add_marker(pytest.mark.aws)
    if fixtures & {"job", "jobs"}:
        item.add_marker(pytest.mark.slow)


_KINDS = ("docker", "slow", "", "trained")
"""The units' order by what their tests need ("" is none of these): a unit goes by its first."""


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The units of work (`_ByModule`), each kept whole, in the order xdist hands them out:
    tests/container, then those that train, so that a long unit does not end the run alone; then
    those that need no `trained` model, which run while it trains (`_trained_early`), then the
    rest. With the units that need it first, all three workers of `make test-fast` waited on it
    with a CPU idle: 203 s against 150 s. (Ordering by how long each unit took the last time, in
    the pytest cache, took 170 s: a unit's time includes its waits.)"""
    needs: dict[str, set[str]] = {}
    for item in items:
        needed = {*getattr(item, "fixturenames", ()), *(m.name for m in item.iter_markers())}
        needs.setdefault(_ByModule.unit(item.nodeid), set()).update(needed & {*_KINDS, "long"})
    order = {unit: _order(need) for unit, need in needs.items()}
    items.sort(key=lambda item: order[_ByModule.unit(item.nodeid)])  # stable: modules stay whole


def _order(need: set[str]) -> tuple[int, bool, bool]:
    """A unit's place: its kind, by the first of docker, trained, slow that it needs (one that
    needs `trained` and trains too waited 75 s among those that train), then, among those that
    need `trained`, the ones that train first; within each, the `long` ones first (handed out
    last, test_slow_clients' 34 s and then test_multi_model's 28 s ended `make test-fast` alone,
    with a CPU idle)."""
    kind = next((k for k in ("docker", "trained", "slow") if k in need), "")
    return _KINDS.index(kind), "slow" not in need, "long" not in need


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 learnable classes; train has one truncated JPEG; 1 in 5 images is a PNG."""
    return make_dataset(tmp_path_factory.mktemp("dataset"), SampleSpec())


MODEL = {
    **FAST,
    "epochs": 5,
    "image_size": 128,
    "lr": 0.02,
    "warmup_epochs": 0.5,
    "int8": True,
    "checkpoint_epochs": 5,
}
"""128 px: a 4x4 Grad-CAM map; 5 epochs: a model that tells the sample classes apart; its int8
network, as every job's by default; one checkpoint, at the end (no test reads it; the four
before it took 3 of the job's 22 s, 2-core AMD EPYC)."""


def _new_job(
    base: Path,
    data: Path,
    hyperparameters: Mapping[str, Any] = FAST,
    channels: Sequence[str] = ("train", "valid", "test"),
) -> Job:
    """A training job at `base` on a private copy of `data`, not yet run."""
    job = Job(OptMl(base))
    shutil.copytree(data, job.opt_ml.data_dir)
    job.set_channels(*channels)
    job.set_hyperparameters(hyperparameters)
    return job


def _shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's folder, above each xdist worker's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _train_shared_model(shared: Path, dataset: Path, block: bool) -> TrainRun | None:
    """The `trained` model at shared/trained, unless it is there (or, without `block`, being
    trained by another worker); the run, if this call trained it."""
    base, done = shared / "trained", shared / "trained.done"
    with contextlib.suppress(Timeout), FileLock(shared / "trained.lock", -1 if block else 0):
        if not done.exists():
            shutil.rmtree(base, ignore_errors=True)
            run = _new_job(base, dataset, MODEL).run()
            if run.returncode == 0:
                done.touch()
            return run
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    """The pytest-xdist controller of a run of the whole suite (no paths given: `make test`,
    `make test-fast`) trains the `trained` model at once, while its workers start and collect
    (about 20 s on 2 CPUs), rather than when a worker first runs a test: the workers of
    `make test-fast` used to wait on it."""
    config = session.config
    workers = getattr(config.option, "numprocesses", None)
    if os.environ.get("PYTEST_XDIST_WORKER") or not workers:
        return
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return  # some tests only: `_trained_early`, in a worker that runs one that needs it
    shared = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]  # the workers'
    threading.Thread(target=_train_first, args=(shared, workers), name="trained").start()


def _train_first(shared: Path, workers: int) -> None:
    """The shared model, on the CPUs of one worker more (`pytest_configure`): with 3 workers on 2
    CPUs, the one only one worker has. The forkserver this thread starts, and the job it forks,
    keep to them. If the job fails, the first worker that needs the model trains it again, and
    its test shows why."""
    os.sched_setaffinity(threading.get_native_id(), _cpu_share(workers, workers + 1))
    _train_shared_model(shared, make_dataset(shared / "trained-data", SampleSpec()), block=False)


@pytest.fixture(scope="session", autouse=True)
def _trained_early(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """When tests of the session need `trained`, the first worker to start trains it in the
    background while its tests run (the other workers' tests too, on the other CPU), rather than
    when a test first needs it, which the others then waited on with a CPU idle."""
    if not any("trained" in item.fixturenames for item in request.session.items):
        yield
        return
    dataset = request.getfixturevalue("dataset")
    args = (_shared(tmp_path_factory), dataset, False)
    thread = threading.Thread(target=_train_shared_model, args=args, name="trained")
    thread.start()
    yield
    thread.join()


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> OptMl:
    """An /opt/ml tree whose model/ the real training job wrote (test/ held out); one for the
    server tests, launch's and the image's, and for every xdist worker of the run: trained once,
    early (by the xdist controller, `pytest_sessionstart`, or `_trained_early`), while the others
    wait."""
    shared = _shared(tmp_path_factory)
    run = _train_shared_model(shared, dataset, block=True)
    assert run is None or run.returncode == 0, run.stderr
    assert (shared / "trained.done").exists(), "the shared model's training failed; see above"
    return OptMl(shared / "trained")


@pytest.fixture
def job(tmp_path: Path, dataset: Path) -> Job:
    """A training job on a private copy of the dataset with train/valid/test channels."""
    return _new_job(tmp_path / "opt_ml", dataset)


NewJob = Callable[..., Job]


@pytest.fixture(scope="session")
def jobs(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> NewJob:
    """`jobs(name, hyperparameters, channels, data)`: a new training job, for module-scoped
    fixtures that run it once and let several tests read what it wrote."""

    def make(
        name: str,
        hyperparameters: Mapping[str, Any] = FAST,
        channels: Sequence[str] = ("train", "valid", "test"),
        data: Path = dataset,
    ) -> Job:
        return _new_job(tmp_path_factory.mktemp(name), data, hyperparameters, channels)

    return make


VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, not the base Python's


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real moto_server process on a free port, for every AWS API test; its URL."""
    folder = tmp_path_factory.mktemp("moto")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    # Its request recorder on: what a test's command sent, read back with /moto-api/recorder/.
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(folder / "requests.jsonl")}
    with background(args, folder / "moto_server.log", f"{url}/moto-api/", env=env):
        httpx.post(f"{url}/moto-api/recorder/start-recording").raise_for_status()
        yield url


@contextmanager
def background(
    args: Sequence[str], log: Path, ready_url: str, env: Mapping[str, str] | None = None
) -> Iterator[None]:
    """A server process, its output in `log` (a file, not a pipe, which a chatty server such as
    moto would fill), ready once `ready_url` answers; terminated at the end."""
    with log.open("w") as sink:
        process = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_http(ready_url, process, log)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


SAGEMAKER_SDK_CONFIG = """\
SchemaVersion: '1.0'
SageMaker:
  PythonSDK:
    Modules:
      TelemetryOptOut: true
"""


@pytest.fixture(scope="session")
def sagemaker_sdk_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables that give the SageMaker SDK a config with its telemetry off (the SDK
    rejects a config file without SchemaVersion)."""
    config = tmp_path_factory.mktemp("sagemaker-sdk") / "config.yaml"
    config.write_text(SAGEMAKER_SDK_CONFIG)
    return {
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
        "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": str(config),
    }


@pytest.fixture(scope="session")
def _one_botocore_loader() -> Iterator[None]:
    """Every botocore session of this process reads AWS's service models through one loader, as
    the clients of one session already do. A `launch` command builds its sessions once; the tests
    run hundreds of commands in one process, and each new session parsed the same JSON models
    again: 23 of 58 CPU-s in three launch test modules (2-core AMD EPYC)."""
    import botocore.loaders
    import botocore.session

    with pytest.MonkeyPatch.context() as patch:
        shared = functools.cache(botocore.loaders.create_loader)
        patch.setattr(botocore.session, "create_loader", shared)
        yield


@pytest.fixture
def aws_env(moto_server: str, _one_botocore_loader: None) -> dict[str, str]:
    """The environment for the AWS CLI and boto3, aimed at moto_server with fake credentials.

    Every AWS_* variable of the caller is dropped and the config files point at nothing, so the
    user's own profiles, credentials and region can never be used; the venv's `aws` comes first.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {
        **env,
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # Missing credentials fail at once instead of after a probe of the instance metadata.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def wait_for_http(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60
) -> None:
    """Poll `url` until it answers; fail with the process's log if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"{process.args[0]} exited {process.returncode}:\n{log.read_text()}"
            )
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()}")
