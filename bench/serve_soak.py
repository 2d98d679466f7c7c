"""Serving soak: our server under valid, oversized and hostile requests for minutes on end.

The seeded artifact and photos of `bench.serve_load` are made once and our server starts on them
with default settings (`bench._serve_servers.ours`). Then 32 keep-alive connections each send
their next request as soon as the last is answered, for 10 minutes: mostly valid requests (a JPEG
of each size, a JSON list of base64 JPEGs, a .npy batch), mixed with bodies over the server's
limits and hostile ones (deep JSON, a huge integer, garbage, a truncated JPEG, a JPEG of too many
scans, bad custom attributes). `bench._soak_requests.KINDS` says what each must get back; a 503
with Retry-After (overloaded) is allowed for any of them and counted apart. Meanwhile a process
of its own GETs /ping every 100 ms on one connection, and the RSS of the server and of its
children (the decoder processes) is read every second.

Each of the issue's pass criteria gets a verdict line: RSS stays flat, no 500 (nor a transport
error), /ping p99 under 100 ms in every minute; a fourth says whether every answer was the one
expected. The run exits with 1 unless all are met. The result replaces the serve-soak section of
docs/benchmarks.md (unless --no-write); progress goes to stderr and the section to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx
import psutil

from bench._cli import add_output_argument, add_workdir_argument, command, log_to_stderr, work_in
from bench._markdown import replace_section
from bench._serve_fixtures import make_artifact, make_photos
from bench._serve_servers import ours
from bench._soak_report import (
    OVERLOADED,
    Answer,
    Method,
    Ping,
    Rss,
    SoakRun,
    counts,
    mib,
    render,
    verdicts,
)
from bench._soak_requests import KINDS, Request, build_requests, describe
from bench.serve_load import SECTION as THROUGHPUT_SECTION
from bench.serve_load import SIZES
from container.sagemaker_env import OptMl
from container.serving.settings import ServeSettings

__all__ = ["CONNECTIONS", "SECTION", "SoakSettings", "main"]

logger = logging.getLogger(__name__)

SECTION = "serve-soak"
"""The marker name of this benchmark's section in the output document."""
CONNECTIONS = 32
_MINUTES = 10.0
_PING_EVERY_S = 0.1
_SAMPLE_EVERY_S = 1.0
_REQUEST_TIMEOUT_S = 120.0
_PING_TIMEOUT_S = 10.0
_PROBE_START_TIMEOUT_S = 120.0  # a spawned process imports torch before its first ping
_MAX_RETRY_AFTER_S = 1.0  # a client honours Retry-After, up to this
_PHOTOS_PER_SIZE = 4
_ARTIFACT_SEED, _PHOTO_SEED = 0, 7  # bench.serve_load's: the same model and photos

_PingRow = tuple[float, float, str]  # (time.monotonic() when answered, latency, outcome)


@dataclass(frozen=True)
class SoakSettings:
    """How long, how many connections, where the result goes."""

    seconds: float
    connections: int
    output: Path
    write: bool
    workdir: Path | None  # keep the artifact, photos and server log here; None = temporary
    command: str  # how this run was started, for the document


def _outcome(response: httpx.Response) -> str:
    if response.status_code == 503 and "retry-after" in response.headers:
        return OVERLOADED
    return str(response.status_code)


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(float(response.headers.get("retry-after", "0")), _MAX_RETRY_AFTER_S)
    except ValueError:
        return _MAX_RETRY_AFTER_S  # an HTTP date


async def _connection(
    client: httpx.AsyncClient,
    url: str,
    requests: Sequence[list[Request]],
    seed: int,
    started: float,
    seconds: float,
    run: SoakRun,
) -> None:
    """One client connection: the next request as soon as the last is answered, for `seconds`."""
    rng = random.Random(seed)
    weights = [k.weight for k in KINDS]
    while time.monotonic() - started < seconds:
        (kind,) = rng.choices(range(len(KINDS)), weights)
        request = rng.choice(requests[kind])
        sent = time.monotonic()
        wait = 0.0
        try:
            response = await client.post(url, content=request.body, headers=request.headers)
        except httpx.TransportError as exc:
            outcome = f"transport: {type(exc).__name__}"
        else:
            outcome = _outcome(response)
            wait = _retry_after(response) if outcome == OVERLOADED else 0.0
        now = time.monotonic()
        run.answers.append(Answer(now - started, kind, outcome, now - sent))
        await asyncio.sleep(wait)


def _probe(url: str, stop: Event, out: Queue[list[_PingRow] | None]) -> None:
    """GET /ping every 100 ms on one connection until `stop`.

    It runs in a process of its own so that the load generator's busy event loop adds nothing to
    the latencies it measures; it sends None once connected, then every ping when stopped.
    """
    pings: list[_PingRow] = []
    with httpx.Client(timeout=_PING_TIMEOUT_S) as client:
        client.get(url)  # connected before the first measured ping
        out.put(None)
        next_at = time.monotonic()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                outcome = str(client.get(url).status_code)
            except httpx.TransportError as exc:
                outcome = f"transport: {type(exc).__name__}"
            now = time.monotonic()
            pings.append((now, now - sent, outcome))
            next_at = max(next_at + _PING_EVERY_S, now)
            time.sleep(next_at - now)
    out.put(pings)


def _read_rss(server: psutil.Process, at_s: float) -> Rss | None:
    """The RSS (VmRSS) of the server, and of it with all its descendants; None once it is gone."""
    try:
        own = server.memory_info().rss
        children = server.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    total, alive = own, set[int]()
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue  # a decoder replaced between the two reads
        alive.add(child.pid)
    return Rss(at_s, own, total, frozenset(alive))


async def _sample(server: psutil.Process, started: float, run: SoakRun) -> None:
    """The RSS every second from the start of the load until cancelled; a log line a minute."""
    logged = 0
    while True:
        sample = _read_rss(server, time.monotonic() - started)
        if sample is not None:
            run.rss.append(sample)
            if sample.at_s >= 60 * (logged + 1):
                logged += 1
                logger.info(
                    "minute %d: %d answers (%s); RSS with children %s MiB, %d children",
                    logged,
                    len(run.answers),
                    counts(Counter(a.outcome for a in run.answers)),
                    mib(sample.total),
                    len(sample.children),
                )
        await asyncio.sleep(_SAMPLE_EVERY_S)


async def _soak(
    url: str,
    server: psutil.Process,
    requests: Sequence[list[Request]],
    settings: SoakSettings,
    run: SoakRun,
) -> None:
    """The load, the /ping probe and the RSS sampler together, for `settings.seconds`."""
    context = multiprocessing.get_context("spawn")  # never fork a process that holds torch
    stop = context.Event()
    pings: Queue[list[_PingRow] | None] = context.Queue()
    ping_url = url.replace("/invocations", "/ping")
    prober = context.Process(target=_probe, args=(ping_url, stop, pings), name="ping-probe")
    prober.start()
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, pings.get, True, _PROBE_START_TIMEOUT_S)
        started = time.monotonic()
        sampler = asyncio.create_task(_sample(server, started, run))
        size = settings.connections
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        async with httpx.AsyncClient(limits=limits, timeout=_REQUEST_TIMEOUT_S) as client:
            await asyncio.gather(
                *(
                    _connection(client, url, requests, n, started, settings.seconds, run)
                    for n in range(size)
                )
            )
        sampler.cancel()
        final = _read_rss(server, time.monotonic() - started)
        run.rss.extend([final] if final is not None else [])
        stop.set()
        rows = await loop.run_in_executor(None, pings.get, True, _PING_TIMEOUT_S * 2)
        run.pings = [Ping(at - started, latency, outcome) for at, latency, outcome in rows or []]
    finally:
        stop.set()
        prober.join(_PING_TIMEOUT_S * 2)
        if prober.is_alive():
            prober.kill()
            prober.join()


def _server_process() -> psutil.Process:
    """Our server: the child of this process that runs `python -m container.serving`."""
    for child in psutil.Process().children():
        if "container.serving" in child.cmdline():
            return child
    raise RuntimeError("no child of this process runs container.serving")


def _benchmark(settings: SoakSettings, work: Path) -> tuple[str, bool]:
    opt_ml = OptMl(work / "opt_ml")
    make_artifact(opt_ml.model_dir, _ARTIFACT_SEED)
    photos = make_photos(work / "photos", SIZES, _PHOTOS_PER_SIZE, _PHOTO_SEED)
    limits = ServeSettings.from_environ({})  # our server's defaults, which it runs with here
    requests = build_requests(photos, limits)
    run = SoakRun()
    with ours(opt_ml, work / "ours", photos[0].files[0].read_bytes()) as endpoint:
        server = _server_process()
        logger.info(
            "ours (pid %d) is serving at %s (%s); %d connections for %g s",
            server.pid,
            endpoint.url,
            endpoint.about,
            settings.connections,
            settings.seconds,
        )
        asyncio.run(_soak(endpoint.url, server, requests, settings, run))
    method = Method(
        seconds=settings.seconds,
        connections=settings.connections,
        ping_every_s=_PING_EVERY_S,
        sample_every_s=_SAMPLE_EVERY_S,
        max_retry_after_s=_MAX_RETRY_AFTER_S,
        request_timeout_s=_REQUEST_TIMEOUT_S,
        ping_timeout_s=_PING_TIMEOUT_S,
        server=endpoint.about,
        requests=describe(photos, limits),
        command=settings.command,
    )
    found = verdicts(run, method)
    for verdict in found:
        (logger.info if verdict.met else logger.error)("%s", verdict.line)
    return render(run, method), all(v.met for v in found)


def main(settings: SoakSettings) -> tuple[str, bool]:
    """Run the soak and write its section into `settings.output` unless told not to.

    Returns the section and whether every criterion was met.
    """
    started = time.monotonic()
    with work_in(settings.workdir, "bench-soak-") as work:
        section, passed = _benchmark(settings, work)
    if settings.write:
        replace_section(settings.output, SECTION, section, after=THROUGHPUT_SECTION)
        logger.info(
            "Wrote the %s section of %s after %.0f s",
            SECTION,
            settings.output,
            time.monotonic() - started,
        )
    return section, passed


def _parse(argv: list[str] | None = None) -> SoakSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=_MINUTES,
        help=f"how long the load runs (default: {_MINUTES:g})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help=f"concurrent keep-alive connections sending requests (default: {CONNECTIONS})",
    )
    add_output_argument(parser, "benchmarks.md", "whose serve-soak section is replaced")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print the section but leave the output file alone (for trial runs)",
    )
    add_workdir_argument(parser, "the artifact, photos and server log")
    args = parser.parse_args(argv)
    return SoakSettings(
        seconds=args.minutes * 60,
        connections=args.connections,
        output=args.output,
        write=not args.no_write,
        workdir=args.workdir,
        command=command("bench.serve_soak", argv),
    )


if __name__ == "__main__":
    log_to_stderr()
    section, passed = main(_parse())
    print(section)
    sys.exit(0 if passed else 1)
