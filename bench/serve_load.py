"""Serving throughput: our server against a naive FastAPI server and TorchServe, same model.

One seeded ResNet-18 artifact (133 classes, with an int8 network) and a few generated photo-like
JPEGs of each size are made once (`bench._serve_fixtures`), and the network alone is timed in each
precision through the server's own Predictor (`bench._serve_model`). Then each server runs on its
own, serving that artifact on localhost: ours (`python -m container.serving`) with its default
SERVE_PRECISION=auto and with fp32, bf16 (where the CPU has native bf16) and int8 forced,
`bench.naive_server`, and TorchServe's `image_classifier` handler three ways: its defaults, one
torch thread per worker, and server-side batching. For every image size wrk warms the server up,
then POSTs the photos over 1, 4 and 16 connections and records requests/s and p50/p99 latency (see
`bench._serve_wrk`). The result replaces the "Serving throughput" section of docs/benchmarks.md;
progress goes to stderr and the section to stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import _serve_torchserve as ts
from bench._cli import add_output_argument, add_workdir_argument, command, log_to_stderr, work_in
from bench._markdown import replace_section
from bench._serve_fixtures import ImageSet, make_artifact, make_photos
from bench._serve_model import measure_model
from bench._serve_report import Kind, Method, ServerResult, render
from bench._serve_servers import Endpoint, ServerError, naive, ours
from bench._serve_wrk import measure, warm_up, wrk_version
from container import int8
from container.devices import cpu_has_bf16
from container.sagemaker_env import OptMl

__all__ = ["SECTION", "SERVERS", "BenchSettings", "main"]

logger = logging.getLogger(__name__)

SECTION = "serve-throughput"
"""The marker name of this benchmark's section in the output document."""
SERVERS = (
    "ours",
    "ours-fp32",
    "ours-bf16",
    "ours-int8",
    "naive",
    "torchserve",
    "torchserve-1-thread",
    "torchserve-batched",
)
"""What `--servers` chooses from, in the order they run; `ours` is SERVE_PRECISION=auto, and
`ours-PRECISION` forces that precision."""
_FORCED = {"ours-fp32": "fp32", "ours-bf16": "bf16", "ours-int8": "int8"}
SIZES = ((500, 375), (1024, 768), (3000, 2000))
CONNECTIONS = (1, 4, 16)
TS_BATCHING = ts.Batching(size=16, delay_ms=50)
"""TorchServe's best batching found here, at 16 connections and 1024x768: of batchSize 4, 8, 16
and 32 with maxBatchDelay 5 to 200 ms, 16 with 50 ms or more gave the most req/s (about 43, twice
the next) and the lowest p99; 50 ms costs least at 1 connection."""
_SECONDS, _WARM_UP_S, _MODEL_SECONDS = 12.0, 4.0, 10.0
_QUICK_SIZES = ((1024, 768),)
_QUICK_CONNECTIONS = (1, 16)
_QUICK_SECONDS, _QUICK_WARM_UP_S, _QUICK_MODEL_SECONDS = 4.0, 2.0, 2.5
_ARTIFACT_SEED = 0
_PHOTO_SEED = 7

Start = Callable[[], AbstractContextManager[Endpoint]]


@dataclass(frozen=True)
class BenchSettings:
    """What to run: image sizes, connection counts, durations, servers, where results go."""

    sizes: tuple[tuple[int, int], ...]
    connections: tuple[int, ...]
    seconds: float
    warm_up_s: float
    model_seconds: float  # the network alone: timed per precision and batch size
    photos_per_size: int
    servers: tuple[str, ...]
    torchserve_venv: Path
    ts_batching: ts.Batching
    output: Path
    workdir: Path | None  # keep the artifact, photos and server logs here; None = temporary
    command: str  # how this run was started, for the document


@dataclass(frozen=True)
class _Files:
    """What the servers are given: the /opt/ml tree (model/ = the artifact) and the photos."""

    work: Path
    opt_ml: OptMl
    photos: list[ImageSet]

    @property
    def probe(self) -> bytes:
        """The photo each server must answer with 200 before it counts as ready."""
        return self.photos[0].files[0].read_bytes()


_NO_BF16 = (
    "this CPU has no native bf16 units (avx512_bf16 or amx_bf16): bf16 would run slower than "
    "fp32 here, and auto does not try it"
)


def _setup(name: str, settings: BenchSettings) -> tuple[Kind, str]:
    if name == "ours":
        return "ours", (
            "`python -m container.serving` with only `SAGEMAKER_BASE_DIR` and the port set, so "
            "all defaults: dynamic batching, one worker, and `SERVE_PRECISION=auto`, which at "
            "warm-up times every precision this CPU and artifact allow (fp32; bf16 where the CPU "
            "has native bf16 units; int8 where the artifact's int8 network may be served) at "
            "batch 1 and 16 and serves the fastest"
        )
    if name in _FORCED:
        return "forced", (
            f"as ours, but `SERVE_PRECISION={_FORCED[name]}`: the same server, that precision "
            "forced"
        )
    if name == "naive":
        return "naive", (
            "`bench/naive_server.py`: FastAPI + uvicorn, one worker; PIL open + convert RGB, "
            "torchvision Resize(256) / CenterCrop(224) / ToTensor / Normalize, batch of 1, fp32 "
            "eager under `torch.inference_mode`, softmax top 5"
        )
    how = {
        "torchserve": "defaults; each worker keeps torch's default thread count (all cores)",
        "torchserve-1-thread": "defaults but `OMP_NUM_THREADS=1`: one torch thread per worker, "
        "so its one worker per core no longer oversubscribes the cores",
        "torchserve-batched": f"model registered with {settings.ts_batching.label}; each worker "
        "keeps torch's default thread count",
    }[name]
    return "torchserve", (
        f"TorchServe, `image_classifier` handler, {how}; `torchserve --start --foreground --ncs "
        "--disable-token-auth`, system metrics off"
    )


def _label(name: str, settings: BenchSettings) -> str:
    if name == "torchserve-batched":
        return f"TorchServe ({settings.ts_batching.label})"
    if name in _FORCED:
        return f"ours ({_FORCED[name]})"
    return {
        "ours": "ours (auto)",
        "naive": "naive",
        "torchserve": "TorchServe (default)",
        "torchserve-1-thread": "TorchServe (1 thread per worker)",
    }[name]


def _result(name: str, settings: BenchSettings) -> ServerResult:
    kind, setup = _setup(name, settings)
    result = ServerResult(_label(name, settings), kind, setup, precision=_FORCED.get(name))
    if name == "ours-bf16" and not cpu_has_bf16():
        result.unavailable = _NO_BF16
    return result


def _starter(name: str, files: _Files, settings: BenchSettings) -> Start:
    work = files.work / name
    if name == "ours" or name in _FORCED:
        return lambda: ours(files.opt_ml, work, files.probe, _FORCED.get(name))
    if name == "naive":
        return lambda: naive(files.opt_ml.model_dir, work, files.probe)
    batching = settings.ts_batching if name == "torchserve-batched" else None
    threads = 1 if name == "torchserve-1-thread" else None
    store = files.work / "model-store"
    venv = settings.torchserve_venv
    return lambda: ts.torchserve(venv, store, work, batching, files.probe, threads)


def _measure_server(
    result: ServerResult, start: Start, settings: BenchSettings, files: _Files
) -> None:
    """Start the server, then warm up and measure every size and connection count; stop it."""
    with ExitStack() as stack:
        try:
            endpoint = stack.enter_context(start())
        except ServerError as exc:
            if result.kind != "torchserve":
                raise
            result.unavailable = str(exc).splitlines()[0]
            logger.error("%s did not start: %s", result.name, exc)
            return
        result.setup += f"; it reported: {endpoint.about}"
        if result.kind == "ours":
            result.precision = endpoint.precision
            result.name = f"ours (auto: {endpoint.precision or '?'})"
            if endpoint.measured:
                result.setup += f"; at warm-up it {endpoint.measured}"
        logger.info("%s is serving at %s (%s)", result.name, endpoint.url, endpoint.about)
        for images in files.photos:
            warm_up(endpoint.url, images.files, max(settings.connections), settings.warm_up_s)
            runs = result.runs.setdefault(images.label, [])
            for connections in settings.connections:
                run = measure(endpoint.url, images.files, connections, settings.seconds)
                runs.append(run)
                logger.info(
                    "%s, %s, %d connections: %.1f req/s, p50 %.0f ms, p99 %.0f ms "
                    "(host cores %.2f, load %.2f)",
                    result.name,
                    images.label,
                    connections,
                    run.requests_per_s,
                    run.p50_ms,
                    run.p99_ms,
                    run.host_cores,
                    run.load_1min,
                )


def _prepare_torchserve(
    results: Sequence[ServerResult], settings: BenchSettings, files: _Files
) -> None:
    """Archive the model for TorchServe, or mark its servers unavailable with the reason."""
    wanted = [r for r in results if r.kind == "torchserve"]
    if not wanted:
        return
    reason = ts.unavailable(settings.torchserve_venv)
    if reason is None:
        try:
            ts.archive(settings.torchserve_venv, files.opt_ml.model_dir, files.work / "model-store")
        except subprocess.CalledProcessError as exc:
            reason = f"torch-model-archiver failed: {exc.stderr.decode(errors='replace')[-500:]}"
    for result in wanted:
        result.unavailable = reason


def _versions(settings: BenchSettings) -> list[tuple[str, str]]:
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    found = [
        ("fastapi", importlib.metadata.version("fastapi")),
        ("uvicorn", importlib.metadata.version("uvicorn")),
        ("wrk", wrk_version()),
    ]
    if ts.unavailable(settings.torchserve_venv) is None:
        found += [
            ("torchserve", f"{ts.version(settings.torchserve_venv)} ({settings.torchserve_venv})"),
            ("java", java.stderr.splitlines()[0] if java.stderr else "unknown"),
        ]
    return found


def _photos_line(photos: Sequence[ImageSet]) -> str:
    sizes = ", ".join(f"{p.label} ({p.mean_bytes / 1000:.0f} KB)" for p in photos)
    return (
        f"{len(photos[0].files)} generated photo-like JPEGs per size (`bench/_serve_fixtures.py`: "
        f"gradients, shapes, texture and sensor noise; baseline, quality 90, 4:2:0); mean file "
        f"size: {sizes}"
    )


def _model_line(meta: dict[str, Any]) -> tuple[str, bool | None]:
    """The Method list's model entry, and the int8 gate's own verdict (None: no int8)."""
    line = (
        "a seeded, randomly initialised ResNet-18 with a 133-class head, saved once in our "
        "artifact format (`bench/_serve_fixtures.py`); every server loads that `model.pt`"
    )
    entry = meta.get(int8.META_KEY)
    if not entry or not entry.get("passed"):
        return line + "; it has no usable int8 network.", None
    gate = entry["gate"]
    verdict = bool(entry.get("gate_passed", entry["passed"]))
    line += (
        f", and ours its int8 network (`model_int8.pt`), calibrated with "
        f"`container.int8.calibrate` on {entry['calibration_images']} generated 500x375 photos, "
        f"decoded and cropped as the server does, and checked by training's gate "
        f"(`container.training.quantization.gate`) against fp32 on {gate['images']} others: "
        f"top-1 agreement {gate['agreement']:.2%}, where the gate asks at least "
        f"{gate['min_agreement']:.0%} and an accuracy drop of at most "
        f"{100 * gate['max_accuracy_drop']:.1f} points (an untrained network has no true labels, "
        "so fp32's top-1 stands in for them and the drop is 1 minus the agreement). "
    )
    if verdict:
        return line + "It passed.", verdict
    return line + (
        "**The gate failed on this random-weight model**, and the artifact marks its int8 usable "
        "all the same, because this benchmark measures speed only: an untrained network's "
        "logits are nearly tied, so small quantization errors swap its top-1. The accuracy "
        "evidence is a trained model's gate (`tests/training/test_quantization.py`) and the "
        "parity of every precision with fp32 (`tests/serving/test_parity.py`)."
    ), verdict


def _benchmark(settings: BenchSettings, work: Path) -> str:
    opt_ml = OptMl(work / "opt_ml")
    logger.info("Making the artifact and its int8 network (about a minute)")
    meta = make_artifact(opt_ml.model_dir, _ARTIFACT_SEED)
    logger.info("int8: %s", meta[int8.META_KEY]["reason"])
    photos = make_photos(work / "photos", settings.sizes, settings.photos_per_size, _PHOTO_SEED)
    files = _Files(work, opt_ml, photos)
    model = measure_model(opt_ml.model_dir, settings.model_seconds)
    results = [_result(n, settings) for n in settings.servers]
    _prepare_torchserve(results, settings, files)
    for name, result in zip(settings.servers, results, strict=True):
        if result.unavailable is None:
            _measure_server(result, _starter(name, files, settings), settings, files)
    model_line, gate = _model_line(meta)
    method = Method(
        photos=_photos_line(photos),
        model=model_line,
        int8_gate=gate,
        connections=settings.connections,
        seconds=settings.seconds,
        warm_up_s=settings.warm_up_s,
        command=settings.command,
        versions=_versions(settings),
    )
    return render(results, [p.label for p in photos], method, model)


def main(settings: BenchSettings) -> str:
    """Run the benchmark, write its section into `settings.output` and return that section."""
    started = time.monotonic()
    with work_in(settings.workdir, "bench-serve-") as work:
        section = _benchmark(settings, work)
    replace_section(settings.output, SECTION, section)
    logger.info(
        "Wrote the %s section of %s after %.0f s",
        SECTION,
        settings.output,
        time.monotonic() - started,
    )
    return section


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _parse(argv: list[str] | None = None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run while developing: 1024x768 only, 1 and 16 connections, shorter runs",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"length of each measurement (default: {_SECONDS}, --quick: {_QUICK_SECONDS})",
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=None,
        help=f"seconds of warm-up per server and size (default: {_WARM_UP_S}, --quick: "
        f"{_QUICK_WARM_UP_S})",
    )
    parser.add_argument(
        "--model-seconds",
        type=float,
        default=None,
        help="the network alone: seconds timed per precision and batch size (default: "
        f"{_MODEL_SECONDS}, --quick: {_QUICK_MODEL_SECONDS})",
    )
    parser.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=None,
        help="photo sizes as WIDTHxHEIGHT (default: 500x375 1024x768 3000x2000)",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(SERVERS),
        help="which servers to run (default: all)",
    )
    parser.add_argument(
        "--photos-per-size",
        type=int,
        default=4,
        help="different JPEGs per size, sent in turn (default: 4)",
    )
    parser.add_argument(
        "--torchserve-venv",
        type=Path,
        default=Path("/tmp/ts"),
        help="venv with torchserve and torch-model-archiver 0.12 (default: /tmp/ts)",
    )
    parser.add_argument(
        "--ts-batch-size",
        type=int,
        default=TS_BATCHING.size,
        help=f"batchSize of the batched TorchServe (default: {TS_BATCHING.size})",
    )
    parser.add_argument(
        "--ts-batch-delay-ms",
        type=int,
        default=TS_BATCHING.delay_ms,
        help=f"maxBatchDelay of the batched TorchServe (default: {TS_BATCHING.delay_ms})",
    )
    add_output_argument(parser, "benchmarks.md", "whose serving-throughput section is replaced")
    add_workdir_argument(parser, "the artifact, photos, model store and server logs")
    args = parser.parse_args(argv)
    quick = args.quick
    return BenchSettings(
        sizes=tuple(args.sizes or (_QUICK_SIZES if quick else SIZES)),
        connections=_QUICK_CONNECTIONS if quick else CONNECTIONS,
        seconds=args.seconds or (_QUICK_SECONDS if quick else _SECONDS),
        warm_up_s=args.warm_up or (_QUICK_WARM_UP_S if quick else _WARM_UP_S),
        model_seconds=args.model_seconds or (_QUICK_MODEL_SECONDS if quick else _MODEL_SECONDS),
        photos_per_size=args.photos_per_size,
        servers=tuple(s for s in SERVERS if s in args.servers),
        torchserve_venv=args.torchserve_venv,
        ts_batching=ts.Batching(args.ts_batch_size, args.ts_batch_delay_ms),
        output=args.output,
        workdir=args.workdir,
        command=command("bench.serve_load", argv),
    )


if __name__ == "__main__":
    log_to_stderr()
    print(main(_parse()))
