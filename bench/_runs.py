"""The two loops as subprocesses: our `train` job on an /opt/ml tree, and the reference loop.

Each run is a fresh process on the same dataset; this module turns what each one writes (the
job's profile.json and evaluation.json, the reference's result JSON) into one `LoopResult`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from container.sagemaker_env import (
    BASE_DIR_ENV,
    EVALUATION_JSON,
    PROFILE_JSON,
    REQUIRED_CHANNELS,
    OptMl,
    encode_hyperparameters,
    write_training_config,
)

__all__ = ["REPO", "Configuration", "LoopResult", "host_cores", "run_ours", "run_reference"]

REPO = Path(__file__).resolve().parents[1]
_LOG_TAIL = 3000
_PROBE_SIDE = 1024
_PROBE_REPEATS = 5

Headline = Literal["median", "overall"]


@dataclass(frozen=True)
class Configuration:
    """A training setup run by both loops; `hyperparameters` go to both unchanged.

    `headline` says which throughput to compare: the median epoch, or all epochs together when
    one-off work (the linear probe's feature extraction) would make a per-epoch median meaningless.
    """

    name: str
    hyperparameters: Mapping[str, object]  # all but the seed
    linear_probe: bool
    headline: Headline
    seed: int

    @property
    def job_hyperparameters(self) -> dict[str, object]:
        return {**self.hyperparameters, "seed": self.seed}


@dataclass(frozen=True)
class LoopResult:
    """One loop's run of one configuration, per epoch and in total."""

    loop: str
    round: int
    seed: int
    host_cores: float  # `host_cores()` just before the run
    images: list[int]
    train_s: list[float]
    data_s: list[float]  # of train_s, waiting for batches
    wall_s: list[float]
    val_acc: list[float]  # per epoch
    final_val_acc: float  # of the best epoch's model (the one our job ships)
    process_s: float  # the whole subprocess, start-up and final reports included
    setup: dict[str, Any]

    @property
    def images_per_sec(self) -> list[float]:
        return [n / s if s > 0 else 0.0 for n, s in zip(self.images, self.train_s, strict=True)]

    @property
    def median_images_per_sec(self) -> float:
        return statistics.median(self.images_per_sec)

    @property
    def overall_images_per_sec(self) -> float:
        """All epochs' images over all epochs' training time: one-off costs are charged too."""
        return sum(self.images) / sum(self.train_s)

    def headline(self, kind: Headline) -> float:
        return self.median_images_per_sec if kind == "median" else self.overall_images_per_sec


def host_cores() -> float:
    """How many cores a 2-thread matmul gets right now: ~2.0 on a quiet host, below 1 when busy.

    On a shared VM a vCPU can be descheduled by the host for long stretches; two OpenMP threads
    then wait on each other at every barrier and run slower than one. Recording this before each
    run says which numbers were taken on a contended host.
    """
    threads = torch.get_num_threads()
    a = torch.randn(_PROBE_SIDE, _PROBE_SIDE)

    def timed(n: int) -> float:
        torch.set_num_threads(n)
        a @ a
        start = time.perf_counter()
        for _ in range(_PROBE_REPEATS):
            a @ a
        return time.perf_counter() - start

    try:
        one = statistics.median(timed(1) for _ in range(3))
        two = statistics.median(timed(2) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return one / two


def _run(command: list[str], log: Path, env: Mapping[str, str] | None = None) -> float:
    """Run `command` from the repository root, output to `log`; the seconds it took."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        done = subprocess.run(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL:]
        raise RuntimeError(f"{command[1]} exited with {done.returncode}; end of {log}:\n{tail}")
    return seconds


def _opt_ml(base: Path, data: Path, hyperparameters: Mapping[str, object]) -> OptMl:
    """An /opt/ml tree with the required channels (train and valid) copied from `data`."""
    opt_ml = OptMl(base)
    for channel in REQUIRED_CHANNELS:
        shutil.copytree(data / channel, opt_ml.channel_dir(channel))
    write_training_config(opt_ml, REQUIRED_CHANNELS, hyperparameters)
    return opt_ml


def run_ours(data: Path, work: Path, config: Configuration, round_: int) -> LoopResult:
    """The real `train` entry point on a fresh /opt/ml tree; numbers from its reports."""
    opt_ml = _opt_ml(work / "opt_ml", data, config.job_hyperparameters)
    env = {**os.environ, BASE_DIR_ENV: str(opt_ml.base)}
    cores = host_cores()
    seconds = _run([sys.executable, str(REPO / "train")], work / "train.log", env)
    reports = opt_ml.output_data_dir
    profile = json.loads((reports / PROFILE_JSON).read_text())
    evaluation = json.loads((reports / EVALUATION_JSON).read_text())
    phases = [e["seconds"] for e in profile["epochs"]]
    return LoopResult(
        loop="ours",
        round=round_,
        seed=config.seed,
        host_cores=cores,
        images=[e["train_images"] for e in profile["epochs"]],
        train_s=[p["data"] + p["forward_backward"] + p["optimizer"] for p in phases],
        data_s=[p["data"] for p in phases],
        wall_s=[e["wall_s"] for e in profile["epochs"]],
        val_acc=[h["val_acc"] for h in evaluation["history"]],
        final_val_acc=evaluation["splits"]["valid"]["accuracy"],
        process_s=seconds,
        setup={
            **profile["setup"],
            "phases": phases,
            "valid_images": evaluation["splits"]["valid"]["images"],
        },
    )


def run_reference(
    data: Path, work: Path, config: Configuration, round_: int, workers: int
) -> LoopResult:
    """`bench.reference_train` in its own process on the same files and hyperparameters."""
    result = work / "result.json"
    command = [sys.executable, "-m", "bench.reference_train", str(data), "--output", str(result)]
    command += ["--workers", str(workers)]
    hyperparameters = encode_hyperparameters(config.job_hyperparameters)
    command += [f"--hp={k}={v}" for k, v in hyperparameters.items()]
    if config.linear_probe:
        command.append("--linear-probe")
    cores = host_cores()
    seconds = _run(command, work / "reference.log")
    record = json.loads(result.read_text())
    epochs = record["epochs"]
    return LoopResult(
        loop="reference",
        round=round_,
        seed=config.seed,
        host_cores=cores,
        images=[e["images"] for e in epochs],
        train_s=[e["train_s"] for e in epochs],
        data_s=[e["data_s"] for e in epochs],
        wall_s=[e["wall_s"] for e in epochs],
        val_acc=[e["val_acc"] for e in epochs],
        final_val_acc=max(e["val_acc"] for e in epochs),  # its best epoch, as ours ships
        process_s=seconds,
        setup=record["setup"],
    )
