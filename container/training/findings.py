"""The profiler's findings: what SageMaker's ProfilerReport would conclude, from our own profile.

SageMaker Debugger's profiler rules need the Debugger service (closed to new customers) and its
framework profiler, which does not support PyTorch 2. The questions they answer are answered
here from profile.json (`profiler`): phase seconds per epoch, each step's duration, system samples
and the time to the first step. Each finding gets a verdict ("ok", "issues_found",
"not_evaluated"), the numbers behind it and, when it fires, what to change, by hyperparameter name.

Thresholds are the rules' defaults, from smdebug's rule code (awslabs/sagemaker-debugger,
smdebug/profiler/analysis/rules/<rule>.py; the same defaults are in smdebug_rulesconfig's
profiler_rules/rules.py, installed with the SageMaker SDK), except where noted:

- CPUBottleneck (cpu_bottleneck.py): threshold=50 (% of data points), gpu_threshold=10,
  cpu_threshold=90 (any core, as the rule reads per-core CPUUtilization events);
- LowGPUUtilization (low_gpu_utilization.py): threshold_p95=70, threshold_p5=10, window=500;
- GPUMemoryIncrease (gpu_memory_increase.py): increase=5 (% of GPU memory), window=10;
- BatchSize (batch_size.py): cpu_threshold_p95=70, gpu_threshold_p95=70,
  gpu_memory_threshold_p95=70, window=500;
- StepOutlier (step_outlier.py): stddev=3, n_outliers=10, judged only past 100 steps;
- MaxInitializationTime (max_initialization_time.py): threshold=20 (minutes to the first step);
- time between steps: the ProfilerReport notebook (rules/docker/profiler_report.ipynb) calls
  more than 25 % of the time in phase "others" significant; checkpoints are that time here, and
  evaluation is held to the same share;
- waiting for batches: ours (20 %). smdebug's Dataloader rule only counts loader processes
  against cores (min_threshold=70 %, max_threshold=200 %), which would contradict `workers=auto`
  on a CPU host, and cannot see the wait itself.

The rules' `patience` (1000 data points) keeps start-up out of their verdicts; the job's samples
begin with training, so only its first minute (or first epoch, if shorter) is left out.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from container import html_page
from container.decoding import Preprocessing

__all__ = ["Finding", "Verdict", "findings_html", "judge", "log_issues"]

logger = logging.getLogger(__name__)

Verdict = Literal["ok", "issues_found", "not_evaluated"]

# CPUBottleneck
CPU_BOTTLENECK_SHARE = 50.0
CPU_BOTTLENECK_GPU = 10.0
CPU_BOTTLENECK_CPU = 90.0
# LowGPUUtilization
LOW_GPU_P95 = 70.0
LOW_GPU_P5 = 10.0
WINDOW = 500  # LowGPUUtilization and BatchSize
# GPUMemoryIncrease
MEMORY_INCREASE = 5.0
MEMORY_WINDOW = 10
# BatchSize
BATCH_CPU_P95 = 70.0
BATCH_GPU_P95 = 70.0
BATCH_GPU_MEMORY_P95 = 70.0
# StepOutlier
OUTLIER_STDDEV = 3.0
OUTLIER_COUNT = 10
OUTLIER_MIN_STEPS = 100
# MaxInitializationTime
MAX_INITIALIZATION_MIN = 20.0
# ProfilerReport's "others" share
BETWEEN_STEPS_SHARE = 25.0
# ours
DATA_WAIT_SHARE = 20.0
MIN_SAMPLES = 10
WARMUP_S = 60.0


@dataclass(frozen=True)
class Finding:
    """One question about the run's speed, answered: a verdict, its evidence, what to do."""

    name: str
    title: str
    verdict: Verdict
    message: str
    recommendation: str = ""
    numbers: dict[str, float | int | None] = field(default_factory=dict)
    thresholds: dict[str, float | int] = field(default_factory=dict)
    rule: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Check:
    """One question asked of every profile: its name, the rule it stands for and the rule's
    thresholds; each method answers it with one verdict."""

    name: str
    title: str
    rule: str
    limits: dict[str, float | int]

    def ok(self, message: str, numbers: dict[str, float | int | None]) -> Finding:
        return Finding(self.name, self.title, "ok", message, "", numbers, self.limits, self.rule)

    def issue(
        self, message: str, recommendation: str, numbers: dict[str, float | int | None]
    ) -> Finding:
        return Finding(
            self.name,
            self.title,
            "issues_found",
            message,
            recommendation,
            numbers,
            self.limits,
            self.rule,
        )

    def not_evaluated(self, why: str) -> Finding:
        return Finding(
            self.name, self.title, "not_evaluated", why, thresholds=self.limits, rule=self.rule
        )


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole > 0 else 0.0


def _q(values: Sequence[float], q: float) -> float:
    return round(float(np.quantile(values, q)), 1)


def _epochs(profile: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(profile.get("epochs") or [])


def _setup(profile: Mapping[str, Any]) -> Mapping[str, Any]:
    return profile.get("setup") or {}


def _gpu_samples(profile: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Samples with a GPU reading, start-up left out (see the module docstring)."""
    epochs = _epochs(profile)
    warmup = min(WARMUP_S, epochs[0]["wall_s"]) if epochs else WARMUP_S
    return [
        s
        for s in profile.get("samples") or []
        if s.get("gpu_percent") is not None and s["t"] >= warmup
    ]


def _no_gpu(check: _Check, samples: int) -> Finding:
    return check.not_evaluated(
        "No GPU readings: the job trained on the CPU (or NVML was missing)."
        if samples == 0
        else f"Only {samples} GPU readings after start-up; at least {MIN_SAMPLES} are needed."
    )


def _workers_advice(setup: Mapping[str, Any]) -> str:
    workers, cpus = setup.get("loader_workers"), setup.get("cpu_threads")
    if isinstance(workers, int) and isinstance(cpus, int) and workers < cpus - 1:
        return (
            f"raise `workers` (now {workers}; the job has {cpus} CPUs; on a CPU-only host each "
            "worker takes a core from the model)"
        )
    gpu = str(setup.get("device", "")).startswith("cuda")
    return f"use an instance type with more CPUs{' per GPU' if gpu else ''} (the job has {cpus})"


def _resize_advice(setup: Mapping[str, Any]) -> str:
    size = setup.get("image_size")
    side = (
        f" (short side about {Preprocessing.for_image_size(size).resize_size} px for "
        f"image_size={size})"
        if isinstance(size, int)
        else ""
    )
    return (
        f"store the images already resized{side}: decoding a large photo costs more than the "
        "training step that uses a small crop of it"
    )


# --- the findings ------------------------------------------------------------------------------


def _initialization(profile: Mapping[str, Any]) -> Finding:
    check = _Check(
        "initialization",
        "Initialisation time",
        "MaxInitializationTime",
        {"threshold_min": MAX_INITIALIZATION_MIN},
    )
    init = profile.get("initialization_s")
    if init is None:
        return check.not_evaluated(
            "No training step ran (a run resumed after its last epoch only reports)."
        )
    training = sum(e["wall_s"] for e in _epochs(profile))
    numbers: dict[str, float | int | None] = {
        "initialization_s": round(init, 1),
        "training_s": round(training, 1),
        "initialization_percent": _pct(init, init + training),
    }
    message = (
        f"The first training step started {init:.1f} s after the process did "
        f"({numbers['initialization_percent']}% of the time to the end of the last epoch)."
    )
    if init <= MAX_INITIALIZATION_MIN * 60:
        return check.ok(message, numbers)
    return check.issue(
        message + f" That is more than the {MAX_INITIALIZATION_MIN:.0f} minutes allowed.",
        "Before the first step the job unpacks archives, checks every image once and loads the "
        "starting weights; the log's timestamps between 'Device ...' and 'Epoch 1/...' show which "
        "took the time. Give the channels folders of images rather than one archive, and an "
        "instance type with more CPUs (images are checked in parallel).",
        numbers,
    )


def _dataloader(profile: Mapping[str, Any]) -> Finding:
    check = _Check(
        "dataloader",
        "Waiting for batches",
        "Dataloader (threshold ours)",
        {"threshold_percent": DATA_WAIT_SHARE},
    )
    epochs = _epochs(profile)
    wait = sum(e["seconds"]["data"] for e in epochs)
    busy = wait + sum(e["seconds"]["forward_backward"] + e["seconds"]["optimizer"] for e in epochs)
    if busy <= 0:
        return check.not_evaluated("No training steps were timed.")
    setup = _setup(profile)
    share = _pct(wait, busy)
    numbers: dict[str, float | int | None] = {
        "wait_s": round(wait, 2),
        "steps_s": round(busy, 2),
        "wait_percent": share,
        "workers": setup.get("loader_workers"),
        "cpus": setup.get("cpu_threads"),
    }
    message = (
        f"Training steps spent {share}% of their time ({wait:.1f} of {busy:.1f} s) waiting for "
        f"the next batch, with {numbers['workers']} loader workers."
    )
    if share <= DATA_WAIT_SHARE:
        return check.ok(message, numbers)
    return check.issue(
        message + " Decoding and cropping images cannot keep up with the model.",
        f"The loader is the bottleneck: {_workers_advice(setup)}, or {_resize_advice(setup)}.",
        numbers,
    )


def _cpu_bottleneck(profile: Mapping[str, Any]) -> Finding:
    check = _Check(
        "cpu_bottleneck",
        "CPU bottleneck",
        "CPUBottleneck",
        {
            "threshold_percent": CPU_BOTTLENECK_SHARE,
            "gpu_threshold": CPU_BOTTLENECK_GPU,
            "cpu_threshold": CPU_BOTTLENECK_CPU,
        },
    )
    samples = _gpu_samples(profile)
    if len(samples) < MIN_SAMPLES:
        return _no_gpu(check, len(samples))
    stalled = [
        s
        for s in samples
        if s["gpu_percent"] < CPU_BOTTLENECK_GPU
        and s.get("cpu_max_core_percent", s["cpu_percent"]) > CPU_BOTTLENECK_CPU
    ]
    share = _pct(len(stalled), len(samples))
    numbers: dict[str, float | int | None] = {
        "samples": len(samples),
        "bottleneck_samples": len(stalled),
        "bottleneck_percent": share,
    }
    message = (
        f"In {share}% of {len(samples)} samples the GPU was below {CPU_BOTTLENECK_GPU:.0f}% busy "
        f"while a CPU core was above {CPU_BOTTLENECK_CPU:.0f}%."
    )
    if share <= CPU_BOTTLENECK_SHARE:
        return check.ok(message, numbers)
    setup = _setup(profile)
    return check.issue(
        message + " The GPU waits for the CPU.",
        f"Move image decoding off the busy core: {_workers_advice(setup)}; "
        f"{_resize_advice(setup)}.",
        numbers,
    )


def _low_gpu(profile: Mapping[str, Any]) -> Finding:
    check = _Check(
        "low_gpu_utilization",
        "GPU utilisation",
        "LowGPUUtilization",
        {"threshold_p95": LOW_GPU_P95, "threshold_p5": LOW_GPU_P5, "window": WINDOW},
    )
    samples = _gpu_samples(profile)
    if len(samples) < MIN_SAMPLES:
        return _no_gpu(check, len(samples))
    values = [s["gpu_percent"] for s in samples][-WINDOW:]
    p95, p5 = _q(values, 0.95), _q(values, 0.05)
    numbers: dict[str, float | int | None] = {"samples": len(values), "p95": p95, "p5": p5}
    message = f"GPU utilisation: p95 {p95}%, p5 {p5}% over the last {len(values)} samples."
    batch = _setup(profile).get("batch_size")
    if p95 < LOW_GPU_P95:
        return check.issue(
            message + f" The GPU is under-used (p95 below {LOW_GPU_P95:.0f}%).",
            "Look at the data-loader and CPU findings first; if they are ok, raise `batch_size` "
            f"(now {batch}) and `lr` with it, or use a smaller GPU instance type.",
            numbers,
        )
    if p5 < LOW_GPU_P5:
        return check.issue(
            message + f" Utilisation swings between busy and idle (p5 below {LOW_GPU_P5:.0f}%).",
            "The GPU idles between busy spells: see the data-loader, checkpoint and evaluation "
            "findings for where the time goes.",
            numbers,
        )
    return check.ok(message, numbers)


def _memory_increase(profile: Mapping[str, Any]) -> Finding:
    check = _Check(
        "gpu_memory_increase",
        "GPU memory increase",
        "GPUMemoryIncrease",
        {"increase_percent": MEMORY_INCREASE, "window": MEMORY_WINDOW},
    )
    samples = _gpu_samples(profile)
    total = profile.get("gpu_memory_total_mb")
    if len(samples) < MIN_SAMPLES or not total:
        return _no_gpu(check, len(samples) if total else 0)
    used = [100.0 * (s.get("gpu_memory_mb") or 0.0) / total for s in samples]
    # The rule's moving averages, as it computes them each time a sample arrives.
    increases = [
        statistics.fmean(used[k - MEMORY_WINDOW : k])
        - statistics.fmean(used[k - MEMORY_WINDOW - 1 : k - 2])
        for k in range(MEMORY_WINDOW + 2, len(used) + 1)
    ]
    jumps = sum(1 for d in increases if d > MEMORY_INCREASE)
    numbers: dict[str, float | int | None] = {
        "samples": len(used),
        "first_percent": round(used[0], 1),
        "peak_percent": round(max(used), 1),
        "last_percent": round(used[-1], 1),
        "max_increase_percent": round(max(increases, default=0.0), 1),
        "violations": jumps,
    }
    message = (
        f"GPU memory in use went from {numbers['first_percent']}% to {numbers['last_percent']}% "
        f"(peak {numbers['peak_percent']}%); its {MEMORY_WINDOW}-sample average rose by at most "
        f"{numbers['max_increase_percent']} points at once."
    )
    if not jumps:
        return check.ok(message, numbers)
    batch = _setup(profile).get("batch_size")
    return check.issue(
        message + f" It jumped by more than {MEMORY_INCREASE:.0f} points {jumps} time(s).",
        "If memory keeps growing the job will run out of GPU memory: lower `batch_size` "
        f"(now {batch}) or use an instance type with more GPU memory.",
        numbers,
    )


def _batch_size(profile: Mapping[str, Any]) -> Finding:
    check = _Check(
        "batch_size",
        "Batch size too small",
        "BatchSize",
        {
            "cpu_threshold_p95": BATCH_CPU_P95,
            "gpu_threshold_p95": BATCH_GPU_P95,
            "gpu_memory_threshold_p95": BATCH_GPU_MEMORY_P95,
            "window": WINDOW,
        },
    )
    samples = _gpu_samples(profile)[-WINDOW:]
    total = profile.get("gpu_memory_total_mb")
    if len(samples) < MIN_SAMPLES or not total:
        return _no_gpu(check, len(samples) if total else 0)
    cpu = _q([s["cpu_percent"] for s in samples], 0.95)
    gpu = _q([s["gpu_percent"] for s in samples], 0.95)
    memory = _q([100.0 * (s.get("gpu_memory_mb") or 0.0) / total for s in samples], 0.95)
    numbers: dict[str, float | int | None] = {
        "samples": len(samples),
        "cpu_p95": cpu,
        "gpu_p95": gpu,
        "gpu_memory_p95": memory,
    }
    message = f"p95 of CPU {cpu}%, GPU {gpu}%, GPU memory {memory}%."
    if cpu >= BATCH_CPU_P95 or gpu >= BATCH_GPU_P95 or memory >= BATCH_GPU_MEMORY_P95:
        return check.ok(message, numbers)
    batch = _setup(profile).get("batch_size")
    return check.issue(
        message + " All three are below 70%: the machine is bigger than the batches need.",
        f"Raise `batch_size` (now {batch}; scale `lr` with it), or use a smaller instance type.",
        numbers,
    )


def _step_outliers(profile: Mapping[str, Any]) -> Finding:
    check = _Check(
        "step_outliers",
        "Step-time outliers",
        "StepOutlier",
        {"stddev": OUTLIER_STDDEV, "n_outliers": OUTLIER_COUNT},
    )
    steps = [
        (e["epoch"], i, t) for e in _epochs(profile) for i, t in enumerate(e.get("step_s", []))
    ]
    if len(steps) <= OUTLIER_MIN_STEPS:
        return check.not_evaluated(
            f"{len(steps)} timed training steps; StepOutlier judges from {OUTLIER_MIN_STEPS + 1} "
            "on."
        )
    values = np.array([t for _, _, t in steps])
    mean, std = float(values.mean()), float(values.std())
    limit = mean + OUTLIER_STDDEV * std
    outliers = [(epoch, i, t) for epoch, i, t in steps if t > limit]
    numbers: dict[str, float | int | None] = {
        "steps": len(steps),
        "mean_s": round(mean, 4),
        "stddev_s": round(std, 4),
        "p50_s": round(float(np.quantile(values, 0.5)), 4),
        "p95_s": round(float(np.quantile(values, 0.95)), 4),
        "max_s": round(float(values.max()), 4),
        "outlier_above_s": round(limit, 4),
        "outliers": len(outliers),
    }
    message = (
        f"{len(outliers)} of {len(steps)} steps took longer than mean + {OUTLIER_STDDEV:.0f} "
        f"standard deviations ({limit:.3f} s; median step {numbers['p50_s']} s)."
    )
    if len(outliers) <= OUTLIER_COUNT:
        return check.ok(message, numbers)
    first = sum(1 for _, i, _ in outliers if i == 0)
    where = ", ".join(f"epoch {e} step {i + 1}" for e, i, _ in outliers[:5])
    cause = (
        f"{first} of them are the first step of an epoch, where the loader starts over"
        if first * 2 >= len(outliers)
        else "they are not tied to the start of epochs"
    )
    return check.issue(
        message + f" E.g. {where}.",
        f"Steps should take about the same time; {cause}. Check for other work on the machine "
        "(the Machine section below), a slow disk under the channels, or memory pressure.",
        numbers,
    )


def _share_per_epoch(
    profile: Mapping[str, Any], phase: str
) -> tuple[float, dict[str, float | int | None]]:
    """The median epoch's share of `phase` (one epoch slowed by something else does not decide
    the verdict), and the numbers behind it."""
    epochs = [e for e in _epochs(profile) if e["wall_s"] > 0]
    seconds = [e["seconds"][phase] for e in epochs]
    wall = sum(e["wall_s"] for e in epochs)
    median = round(statistics.median(100.0 * e["seconds"][phase] / e["wall_s"] for e in epochs), 1)
    return median, {
        "epochs": len(epochs),
        "seconds_per_epoch": round(statistics.fmean(seconds), 3),
        "train_seconds_per_epoch": round(
            statistics.fmean(
                e["seconds"]["data"] + e["seconds"]["forward_backward"] + e["seconds"]["optimizer"]
                for e in epochs
            ),
            3,
        ),
        "median_percent": median,
        "total_percent": _pct(sum(seconds), wall),
    }


def _between_steps(
    profile: Mapping[str, Any], phase: str, name: str, title: str, doing: str, advice: str
) -> Finding:
    """A phase that runs between an epoch's training steps (checkpoints, evaluation): an issue
    above the ProfilerReport's 25% for "others", judged on the median epoch."""
    check = _Check(
        name, title, "ProfilerReport (others)", {"threshold_percent": BETWEEN_STEPS_SHARE}
    )
    if not any(e["wall_s"] > 0 for e in _epochs(profile)):
        return check.not_evaluated("No epoch completed.")
    share, numbers = _share_per_epoch(profile, phase)
    message = (
        f"{doing} took {share}% of each epoch (median; {numbers['seconds_per_epoch']} s per "
        f"epoch against {numbers['train_seconds_per_epoch']} s of training steps; "
        f"{numbers['total_percent']}% of all epoch time)."
    )
    if share <= BETWEEN_STEPS_SHARE:
        return check.ok(message, numbers)
    return check.issue(message, advice, numbers)


def _checkpoints(profile: Mapping[str, Any]) -> Finding:
    return _between_steps(
        profile,
        "checkpoint",
        "checkpoints",
        "Time lost to checkpoints",
        "Writing checkpoints",
        "Every epoch ends by writing last.pt (model, optimiser state and best weights, about 3x "
        "the model) to the checkpoint dir, and model.pt when the epoch is the best so far. That "
        "is what makes a stopped or spot-interrupted job resume, and it weighs only when epochs "
        "are this short: a larger train channel makes the share small. To write last.pt less "
        "often, raise checkpoint_epochs (a stop or spot interruption still writes one; a job "
        "killed without warning redoes up to that many epochs).",
    )


def _evaluation(profile: Mapping[str, Any]) -> Finding:
    return _between_steps(
        profile,
        "evaluation",
        "evaluation",
        "Time lost to evaluation",
        "Evaluating on the valid channel",
        "Every epoch ends with a pass over the whole valid channel: a smaller valid channel "
        "(10-20% of the training images is common) makes it cheaper; if its images are large, "
        f"{_resize_advice(_setup(profile))}.",
    )


_JUDGES = (
    _initialization,
    _dataloader,
    _cpu_bottleneck,
    _low_gpu,
    _batch_size,
    _memory_increase,
    _step_outliers,
    _checkpoints,
    _evaluation,
)


def judge(profile: Mapping[str, Any]) -> list[Finding]:
    """Every finding about a profile (profile.json's shape; keys it lacks are not evaluated)."""
    return [judge_one(profile) for judge_one in _JUDGES]


def log_issues(findings: Sequence[Finding]) -> None:
    """One log line per finding that fired."""
    for found in findings:
        if found.verdict == "issues_found":
            logger.warning("Profiler: %s: %s %s", found.title, found.message, found.recommendation)


_VERDICT_TEXT = {"issues_found": "issues found", "ok": "ok", "not_evaluated": "not evaluated"}


def findings_html(findings: Sequence[Mapping[str, Any]]) -> str:
    """The findings as the report's first section: issues first, each with what to do."""
    order = {"issues_found": 0, "ok": 1, "not_evaluated": 2}
    ranked = sorted(findings, key=lambda f: order.get(f["verdict"], 3))
    issues = sum(1 for f in findings if f["verdict"] == "issues_found")
    return html_page.section(
        "Findings",
        html_page.note(
            f"{issues} of {len(findings)} checks found issues. The checks answer the questions of "
            "SageMaker Debugger's ProfilerReport rules, with their default thresholds, from this "
            "job's own profile."
        ),
        html_page.table(
            ["check", "verdict", "what was found", "what to do"],
            [
                [
                    f["title"],
                    _VERDICT_TEXT.get(f["verdict"], f["verdict"]),
                    f["message"],
                    f["recommendation"],
                ]
                for f in ranked
            ],
        ),
    )
