"""Multi-model endpoint: load time and memory of 8 models, and requests/s with 2 and 8 hot.

Eight different seeded ResNet-18 artifacts (133 classes, 224 px, no int8 network) and a few
generated 224x224 photo-like JPEGs are made first. Then `python serve` with
SAGEMAKER_MULTI_MODEL=true starts with no model; the eight are loaded one after another through
`POST /models` (the server's loadSeconds, memoryMB and form, the client's wall time, the server's
VmRSS after each), each answers one photo, and `--connections` closed-loop clients load all eight,
connection i sending to model i mod 8 (`POST /models/{name}/invoke`). Then all but two are
unloaded newest first (the memoryMB each DELETE answers, the VmRSS around it), the same load runs
against those two, and the last one unloaded is loaded again (is the memory reused?). The
baseline comes last: a single-model server (`bench._serve_servers.ours`) on the first artifact,
in the precision the multi-model server chose for it, under the same load on /invocations. Each
load's mean batch is read from the server's log (its line per invocation).

The result replaces the multi-model section of docs/benchmarks.md (unless --no-write); progress
goes to stderr and the section to stdout. It exits with 1 if any request was answered with other
than 200.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch

from bench._cli import add_output_argument, add_workdir_argument, command, log_to_stderr, work_in
from bench._markdown import replace_section
from bench._multi_model_report import Answer, Load, Measurement, Method, Unload, render
from bench._runs import REPO, host_cores
from bench._serve_fixtures import ARCH, NUM_CLASSES, make_photos
from bench._serve_servers import ServerError, free_ports, ours, running
from bench._serve_wrk import wait_until_quiet
from bench.serve_soak import SECTION as SOAK_SECTION
from container.decoding import Preprocessing
from container.model import build, save_artifact
from container.sagemaker_env import BASE_DIR_ENV, OptMl

__all__ = ["CONNECTIONS", "HOT", "MODELS", "SECTION", "MultiModelSettings", "main"]

logger = logging.getLogger(__name__)

SECTION = "multi-model"
"""The marker name of this benchmark's section in the output document."""
MODELS = 8
HOT = 2
"""The fewer hot models: what is left loaded after the unloads."""
CONNECTIONS = 8
_SECONDS, _WARM_UP_S = 20.0, 5.0
_IMAGE_SIZE = 224
_PHOTO_SIZE = (224, 224)
_PHOTOS = 4
_PHOTO_SEED = 7  # bench.serve_load's
_JPEG = {"Content-Type": "image/jpeg"}
_REQUEST_TIMEOUT_S = 60.0
_LOAD_TIMEOUT_S = 600.0  # SERVE_PRECISION=auto times each precision at load
_READY_TIMEOUT_S = 180.0
_RETRY_S = 0.2
_AFTER_TRANSPORT_ERROR_S = 0.1  # a connection that lost its server does not spin
_LOG_TAIL = 3000
_OUR_VARIABLES = ("SAGEMAKER_", "SERVE_")  # the server's settings: none may leak in from here
_BUDGET = re.compile(r"within (\d+) MiB \(SERVE_MODELS_MEMORY_MB\)")
_WORRYING = re.compile(r" (ERROR|WARNING|CRITICAL) |Traceback")
# A single-model server's lines name no model.
_INVOCATION = re.compile(r"status=200 (?:model_name=(\S+) )?.*? batch=(\d+)")
_PRECISION = re.compile(r"\b(fp32|bf16|fp16|int8) on \w+")  # in a form: "... bf16 on cpu"


@dataclass(frozen=True)
class MultiModelSettings:
    """How many models, how many of them hot at the end, the load, where the result goes."""

    models: int
    hot: int
    connections: int
    seconds: float
    warm_up_s: float
    output: Path
    write: bool
    workdir: Path | None  # keep the artifacts, photos and server logs here; None = temporary
    command: str  # how this run was started, for the document


@dataclass(frozen=True)
class _Server:
    """The multi-model server: its address, its process id and its log."""

    url: str
    pid: int
    log: Path

    def tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL:]


def _make_models(folder: Path, count: int) -> list[Path]:
    """`count` artifacts of seeded, randomly initialised ResNet-18s (seeds 0 to count - 1)."""
    prep = Preprocessing.for_image_size(_IMAGE_SIZE)
    classes = [f"breed {i:03d}" for i in range(NUM_CLASSES)]
    found = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build(ARCH, NUM_CLASSES).eval()
        path = folder / f"model-{seed}"
        save_artifact(
            path, model.state_dict(), arch=ARCH, classes=classes, preprocessing=prep, extra_meta={}
        )
        found.append(path)
    return found


def _vmrss_mib(pid: int) -> float:
    """VmRSS of process `pid`, from /proc/PID/status, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024  # kB


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_OUR_VARIABLES)}


def _wait_for_ping(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    last = "no answer"
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"serve exited with {process.returncode}; see {log}")
            try:
                response = client.get(f"{url}/ping")
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            time.sleep(_RETRY_S)
    raise ServerError(f"{url}/ping never answered 200 in {_READY_TIMEOUT_S:g} s (last: {last})")


@contextmanager
def _multi_server(work: Path) -> Iterator[_Server]:
    """`python serve` with SAGEMAKER_MULTI_MODEL=true and an empty model/, once /ping is 200."""
    base = work / "multi"
    (base / "model").mkdir(parents=True)
    (port,) = free_ports(1)
    env = {
        **_clean_environment(),
        BASE_DIR_ENV: str(base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_MULTI_MODEL": "true",
    }
    log = work / "multi.log"
    with running([sys.executable, "serve"], log=log, cwd=REPO, env=env) as process:
        url = f"http://127.0.0.1:{port}"
        _wait_for_ping(url, process, log)
        yield _Server(url, process.pid, log)


def _checked(response: httpx.Response, what: str, server: _Server) -> Any:
    """The JSON of a 200 answer; ServerError with the answer and the log's end otherwise."""
    if response.status_code != 200:
        raise ServerError(
            f"{what} answered {response.status_code}: {response.text[:500]}; end of "
            f"{server.log}:\n{server.tail()}"
        )
    return response.json()


def _load(client: httpx.Client, server: _Server, path: Path, seed: int) -> Load:
    name = path.name
    sent = time.perf_counter()
    response = client.post(
        f"{server.url}/models",
        json={"model_name": name, "url": str(path)},
        timeout=_LOAD_TIMEOUT_S,
    )
    wall = time.perf_counter() - sent
    body = _checked(response, f"POST /models for {name}", server)
    load = Load(
        name,
        seed,
        int(body["classes"]),
        float(body["loadSeconds"]),
        wall,
        float(body["memoryMB"]),
        str(body["form"]),
        _vmrss_mib(server.pid),
    )
    logger.info(
        "Loaded %s: loadSeconds %.2f (wall %.2f s), memoryMB %.0f, %s; server RSS %.0f MiB",
        name,
        load.load_s,
        load.wall_s,
        load.memory_mb,
        load.form,
        load.rss_mib,
    )
    return load


def _unload(client: httpx.Client, server: _Server, name: str) -> Unload:
    before = _vmrss_mib(server.pid)
    body = _checked(client.delete(f"{server.url}/models/{name}"), f"DELETE {name}", server)
    unload = Unload(name, float(body["memoryMB"]), before, _vmrss_mib(server.pid))
    logger.info(
        "Unloaded %s: memoryMB %.0f answered; server RSS %.0f -> %.0f MiB",
        name,
        unload.memory_mb,
        before,
        unload.rss_after_mib,
    )
    return unload


def _loaded(client: httpx.Client, server: _Server) -> list[str]:
    body = _checked(client.get(f"{server.url}/models"), "GET /models", server)
    return [str(m["modelName"]) for m in body["models"]]


def _top_answers(client: httpx.Client, server: _Server, names: Sequence[str], photo: bytes) -> str:
    """Each model's answer to the same photo: its top class, and how many models gave which."""
    tops, versions = [], set()
    for name in names:
        response = client.post(f"{server.url}/models/{name}/invoke", content=photo, headers=_JPEG)
        answer = _checked(response, f"invoke {name}", server)
        logger.info("%s answers: %s", name, json.dumps(answer)[:200])
        top = answer["predictions"][0]
        tops.append(f"{top['label']} ({top['probability']:.3f})")
        versions.add(answer["model_version"])
    return (
        f"top classes {', '.join(tops)}: {len(set(tops))} different ones from the {len(names)} "
        f"models, which named {len(versions)} different model versions"
    )


def _connection(
    model: str, url: str, photos: Sequence[bytes], first: int, started: float, end: float
) -> tuple[list[Answer], str | None]:
    """One closed-loop client: the next photo as soon as the last is answered, until `end`."""
    answers: list[Answer] = []
    failure: str | None = None
    with httpx.Client(timeout=_REQUEST_TIMEOUT_S) as client:
        n = first
        while time.monotonic() < end:
            sent = time.monotonic()
            try:
                response = client.post(url, content=photos[n % len(photos)], headers=_JPEG)
            except httpx.TransportError as exc:
                outcome = f"transport: {type(exc).__name__}"
                failure = failure or f"{outcome}: {exc}"
                time.sleep(_AFTER_TRANSPORT_ERROR_S)
            else:
                outcome = str(response.status_code)
                if response.status_code != 200 and failure is None:
                    failure = f"{response.status_code} {response.text[:300]}"
            done = time.monotonic()
            answers.append(Answer(model, done - started, done - sent, outcome))
            n += 1
    return answers, failure


def _batches(log: Path, offset: int) -> dict[str, float]:
    """The mean batch a request rode in, per model, from the server's invocation lines in `log`
    after `offset`; under "" for all models together."""
    with log.open("rb") as file:
        file.seek(offset)
        text = file.read().decode(errors="replace")
    rode: dict[str, list[int]] = {"": []}
    for model, batch in _INVOCATION.findall(text):
        rode[""].append(int(batch))
        if model:
            rode.setdefault(model, []).append(int(batch))
    return {model: sum(sizes) / len(sizes) for model, sizes in rode.items() if sizes}


def _measure(
    setup: str,
    targets: Sequence[tuple[str, str]],
    photos: Sequence[bytes],
    settings: MultiModelSettings,
    log: Path,
) -> Measurement:
    """`settings.connections` clients, connection i on target i mod N, warm-up then measured."""
    cores = wait_until_quiet()
    load = os.getloadavg()[0]
    offset = log.stat().st_size
    started = time.monotonic()
    window = (settings.warm_up_s, settings.warm_up_s + settings.seconds)
    end = started + window[1]

    def connection(n: int) -> tuple[list[Answer], str | None]:
        model, url = targets[n % len(targets)]
        return _connection(model, url, photos, n, started, end)

    with ThreadPoolExecutor(settings.connections) as pool:
        done = list(pool.map(connection, range(settings.connections)))
    cores_after = host_cores()  # the server is idle again: what the host left it meanwhile
    answers = tuple(a for found, _ in done for a in found if window[0] <= a.done_s <= window[1])
    failures = [failure for _, failure in done if failure is not None]
    result = Measurement(
        setup,
        tuple(model for model, _ in targets),
        settings.connections,
        settings.seconds,
        answers,
        cores,
        cores_after,
        load,
        failures[0] if failures else None,
        _batches(log, offset),
    )
    logger.info(
        "%s: %.1f req/s, mean batch %.2f, %d not 200 (host cores %.2f before, %.2f after, "
        "load %.2f)",
        setup,
        result.requests_per_s,
        result.batches.get("", 0.0),
        sum(result.failures.values()),
        cores,
        cores_after,
        load,
    )
    return result


def _single_model(
    model: Path,
    precision: str | None,
    photos: Sequence[bytes],
    settings: MultiModelSettings,
    work: Path,
) -> tuple[Measurement, str, float]:
    """The baseline: one model on a single-model server in `precision` (None: auto); its
    measurement, Ready line and RSS."""
    opt_ml = OptMl(work / "single")
    shutil.copytree(model, opt_ml.model_dir)
    logs = work / "single-server"
    with ours(opt_ml, logs, photos[0], precision) as endpoint:
        (server,) = [c for c in psutil.Process().children() if "container.serving" in c.cmdline()]
        rss = _vmrss_mib(server.pid)
        logger.info("Single-model server (RSS %.0f MiB): %s", rss, endpoint.about)
        targets = [(model.name, endpoint.url)]
        run = _measure("single model", targets, photos, settings, logs / "ours.log")
    return run, endpoint.about, rss


def _server_log(server: _Server) -> tuple[str, list[str]]:
    text = server.log.read_text(encoding="utf-8", errors="replace")
    budget = _BUDGET.search(text)
    worrying = [line for line in text.splitlines() if _WORRYING.search(line)]
    for line in worrying:
        logger.warning("server log: %s", line)
    if budget is None:
        return "not in the server's log", worrying
    return (
        f"{budget.group(1)} MiB (`SERVE_MODELS_MEMORY_MB` left at its default: 90% of the "
        "host's memory less what the server held at start and its decoder processes' share)"
    ), worrying


def _benchmark(settings: MultiModelSettings, work: Path) -> tuple[str, bool]:
    logger.info("Making %d artifacts and the photos", settings.models)
    models = _make_models(work / "models", settings.models)
    (images,) = make_photos(work / "photos", [_PHOTO_SIZE], _PHOTOS, _PHOTO_SEED)
    photos = [p.read_bytes() for p in images.files]
    with _multi_server(work) as server, httpx.Client(timeout=_REQUEST_TIMEOUT_S) as client:
        start_rss = _vmrss_mib(server.pid)
        logger.info("Multi-model server up (pid %d, RSS %.0f MiB)", server.pid, start_rss)
        loads = [_load(client, server, path, seed) for seed, path in enumerate(models)]
        names = [m.name for m in models]
        if sorted(_loaded(client, server)) != sorted(names):
            raise ServerError(f"GET /models does not list the {len(names)} models loaded")
        alike = _top_answers(client, server, names, photos[0])

        def targets(hot: Sequence[str]) -> list[tuple[str, str]]:
            return [(n, f"{server.url}/models/{n}/invoke") for n in hot]

        every = _measure(
            f"multi-model, {len(names)} hot", targets(names), photos, settings, server.log
        )
        unloads = [_unload(client, server, n) for n in reversed(names[settings.hot :])]
        if sorted(_loaded(client, server)) != sorted(names[: settings.hot]):
            raise ServerError(f"GET /models does not list the {settings.hot} models left")
        hot = names[: settings.hot]
        few = _measure(f"multi-model, {len(hot)} hot", targets(hot), photos, settings, server.log)
        before = _vmrss_mib(server.pid)
        reload = _load(client, server, models[settings.hot], settings.hot)
    budget, worrying = _server_log(server)
    chosen = _PRECISION.search(loads[0].form)
    precision = chosen.group(1) if chosen else None
    single, single_about, single_rss = _single_model(models[0], precision, photos, settings, work)
    runs = [single, few, every]
    method = Method(
        single_about=(
            f"`SERVE_PRECISION={precision}` (what the multi-model server chose for the same "
            f"artifact; otherwise default settings); it reported: {single_about}"
            if precision
            else f"default settings; it reported: {single_about}"
        ),
        budget=budget,
        start_rss_mib=start_rss,
        single_rss_mib=single_rss,
        photos=(
            f"{len(photos)} generated {images.label} photo-like JPEGs (`bench/_serve_fixtures.py`, "
            f"{images.mean_bytes / 1000:.0f} KB on average) in turn"
        ),
        warm_up_s=settings.warm_up_s,
        answers_alike=alike,
        server_log=worrying,
        command=settings.command,
    )
    ok = not any(m.failures for m in runs)
    return render(loads, unloads, (reload, before), runs, method), ok


def main(settings: MultiModelSettings) -> tuple[str, bool]:
    """Run the benchmark and write its section into `settings.output` unless told not to.

    Returns the section and whether every request was answered with 200.
    """
    started = time.monotonic()
    with work_in(settings.workdir, "bench-multi-model-") as work:
        section, ok = _benchmark(settings, work)
    if settings.write:
        replace_section(settings.output, SECTION, section, after=SOAK_SECTION)
        logger.info(
            "Wrote the %s section of %s after %.0f s",
            SECTION,
            settings.output,
            time.monotonic() - started,
        )
    return section, ok


def _parse(argv: list[str] | None = None) -> MultiModelSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", type=int, default=MODELS, help=f"models loaded (default: {MODELS})"
    )
    parser.add_argument(
        "--hot",
        type=int,
        default=HOT,
        help=f"models left loaded for the second load, after the unloads (default: {HOT})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help=f"closed-loop clients, connection i on hot model i mod N (default: {CONNECTIONS})",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=_SECONDS,
        help=f"length of each measurement (default: {_SECONDS:g})",
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=_WARM_UP_S,
        help=f"load before each measurement that does not count (default: {_WARM_UP_S:g})",
    )
    add_output_argument(parser, "benchmarks.md", "whose multi-model section is replaced")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print the section but leave the output file alone (for trial runs)",
    )
    add_workdir_argument(parser, "the artifacts, photos and server logs")
    args = parser.parse_args(argv)
    if not 1 <= args.hot < args.models:
        parser.error(f"--hot must be from 1 to --models - 1, not {args.hot}")
    return MultiModelSettings(
        models=args.models,
        hot=args.hot,
        connections=args.connections,
        seconds=args.seconds,
        warm_up_s=args.warm_up,
        output=args.output,
        write=not args.no_write,
        workdir=args.workdir,
        command=command("bench.multi_model", argv),
    )


if __name__ == "__main__":
    log_to_stderr()
    section, ok = main(_parse())
    print(section)
    sys.exit(0 if ok else 1)
