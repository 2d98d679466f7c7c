"""Model-only speed: images/s of the server's own Predictor in each precision, no HTTP, no decoding.

The artifact of the serving benchmark is loaded once and run through `container.serving.predictor`
as the server builds it (`optimize="jit"`: traced and frozen TorchScript, channels-last) in fp32,
bf16 (where the CPU has native bf16 units) and int8 (where the artifact's int8 network may be
served), with the plain eager fp32 module (`optimize="eager"`) as the baseline. `predict` is what
the server's batcher calls: uint8 crops in, normalised there, logits and features out, one
`Outputs` per image. Torch gets one thread per usable core, as the server with one worker does.
Every form is warmed up at each batch size (the Predictor's `warm_up`, then an untimed round), then
timed in interleaved rounds so that a noisy minute on a shared host touches all of them alike; a
form's number is the median of its rounds.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench._serve_wrk import wait_until_quiet
from container import int8
from container.devices import cpu_has_bf16
from container.model import load_artifact
from container.serving.predictor import Optimize, Precision, Predictor

__all__ = ["BATCH_SIZES", "ModelRun", "ModelSpeed", "measure_model"]

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 16)
"""Those `SERVE_PRECISION=auto` times at warm-up: 1 and the server's largest batch."""
_ROUNDS = 5
_CPU = torch.device("cpu")


@dataclass
class ModelSpeed:
    """One form of the network: images/s per batch size, or why it was not measured."""

    name: str  # "eager fp32", "fp32", ...
    form: str  # what the Predictor says it runs
    images_per_s: dict[int, float] = field(default_factory=dict)
    unavailable: str | None = None


@dataclass(frozen=True)
class ModelRun:
    """Every form's speed, and how they were taken."""

    forms: list[ModelSpeed]
    threads: int  # torch threads
    seconds: float  # timed per form and batch size, over all rounds
    rounds: int
    host_cores: float  # `host_cores()` just before the timing


def _forms(model_dir: Path) -> list[tuple[str, Predictor | str]]:
    """Each form to time with its Predictor, or the reason it cannot run here."""
    artifact = load_artifact(model_dir, _CPU)

    def build(precision: Precision, optimize: Optimize = "jit") -> Predictor:
        return Predictor(artifact, _CPU, [precision], optimize=optimize)

    forms: list[tuple[str, Predictor | str]] = [
        ("eager fp32", build("fp32", optimize="eager")),
        ("fp32", build("fp32")),
    ]
    forms.append(
        ("bf16", build("bf16"))
        if cpu_has_bf16()
        else ("bf16", "this CPU has no native bf16 (avx512_bf16 or amx_bf16)")
    )
    refused = int8.available(artifact)
    forms.append(("int8", build("int8") if refused is None else refused))
    return forms


def _round(predictor: Predictor, batch: Sequence[torch.Tensor], seconds: float) -> float:
    """Images/s of back-to-back `predict` calls for about `seconds` (at least two calls)."""
    calls, started = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < seconds:
        predictor.predict(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - started)


def measure_model(model_dir: Path, seconds: float) -> ModelRun:
    """Every form's images/s at BATCH_SIZES, each timed for about `seconds` in all, once the
    host is quiet."""
    threads, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    try:
        forms = _forms(model_dir)
        ready = [(name, p) for name, p in forms if isinstance(p, Predictor)]
        side = ready[0][1].prep.image_size  # 224 for the benchmark's artifact
        generator = torch.Generator().manual_seed(0)
        batches = {
            size: [
                torch.randint(0, 256, (side, side, 3), dtype=torch.uint8, generator=generator)
                for _ in range(size)
            ]
            for size in BATCH_SIZES
        }
        for name, predictor in ready:
            logger.info("Model only: warming up %s (%s)", name, predictor.form)
            predictor.warm_up(BATCH_SIZES)
            # TorchScript's profiling executor can still be specialising after those few
            # passes: one untimed round more, as long as a timed one.
            for batch in batches.values():
                _round(predictor, batch, seconds / _ROUNDS)
        quiet = wait_until_quiet()
        rounds: dict[str, dict[int, list[float]]] = {
            name: {size: [] for size in BATCH_SIZES} for name, _ in ready
        }
        for _ in range(_ROUNDS):
            for name, predictor in ready:
                for size, batch in batches.items():
                    rounds[name][size].append(_round(predictor, batch, seconds / _ROUNDS))
    finally:
        torch.set_num_threads(threads)
    results = []
    for name, built in forms:
        if isinstance(built, str):
            results.append(ModelSpeed(name, "-", unavailable=built))
            continue
        speeds = {size: statistics.median(values) for size, values in rounds[name].items()}
        results.append(ModelSpeed(name, built.form, speeds))
        logger.info(
            "Model only, %s: %s img/s at batch %s",
            name,
            " and ".join(f"{v:.1f}" for v in speeds.values()),
            " and ".join(map(str, speeds)),
        )
    return ModelRun(results, cores, seconds, _ROUNDS, quiet)
