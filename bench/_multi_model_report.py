"""The "Multi-model endpoint" section of docs/benchmarks.md, from what a run recorded."""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench._markdown import table
from bench._report import machine
from bench._serve_wrk import QUIET_CORES
from bench._soak_report import counts, percentile

__all__ = ["Answer", "Load", "Measurement", "Method", "Unload", "render"]


@dataclass(frozen=True)
class Load:
    """One `POST /models`: what the server answered, the client's wall time, the RSS after."""

    name: str
    seed: int
    classes: int
    load_s: float  # the server's loadSeconds
    wall_s: float  # the POST, as the client timed it
    memory_mb: float  # the server's memoryMB: what the load added to its resident memory
    form: str
    rss_mib: float  # the server's VmRSS once it answered


@dataclass(frozen=True)
class Unload:
    """One `DELETE /models/{name}`: the memoryMB it answered and the server's RSS around it."""

    name: str
    memory_mb: float
    rss_before_mib: float
    rss_after_mib: float

    @property
    def given_back_mib(self) -> float:
        return self.rss_before_mib - self.rss_after_mib


@dataclass(frozen=True)
class Answer:
    """One request of the load: which model, when it was answered, how long it took, its status."""

    model: str
    done_s: float  # since the load started
    latency_s: float
    outcome: str  # "200", "503", "transport: ReadError", ...


@dataclass(frozen=True)
class Measurement:
    """The answers of one load's measured window, and the host just before it."""

    setup: str
    models: tuple[str, ...]  # the hot models, in the order connections are given to them
    connections: int
    seconds: float
    answers: tuple[Answer, ...]  # those answered inside the window
    host_cores: float  # `host_cores()` just before, with the server idle
    host_cores_after: float  # and just after: something else ran meanwhile if it is low
    load_1min: float
    first_failure: str | None  # the first answer other than 200, as the client saw it
    batches: dict[str, float]  # the mean batch a request rode in, per model ("" = all), warm-up too

    @property
    def requests_per_s(self) -> float:
        return len(self.answers) / self.seconds

    def latencies(self, model: str | None = None) -> list[float]:
        return [a.latency_s for a in self.answers if model is None or a.model == model]

    @property
    def failures(self) -> Counter[str]:
        return Counter(a.outcome for a in self.answers if a.outcome != "200")

    def connections_of(self, index: int) -> int:
        """How many connections sent to the hot model `index` (connection i: model i mod N)."""
        return len(range(index, self.connections, len(self.models)))

    def per_connection(self) -> list[float]:
        """Each hot model's answered requests per connection sending to it."""
        return [
            len(self.latencies(model)) / self.connections_of(index)
            for index, model in enumerate(self.models)
        ]


@dataclass(frozen=True)
class Method:
    """How the run was made, for the document."""

    single_about: str  # the single-model server's Ready line
    budget: str  # the multi-model server's line on its memory budget
    start_rss_mib: float  # the multi-model server's VmRSS with no model
    single_rss_mib: float  # the single-model server's VmRSS with its model, before the load
    photos: str
    warm_up_s: float
    answers_alike: str  # what the models said of the same photo
    server_log: list[str]  # the multi-model server's ERROR and WARNING lines
    command: str


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def _batch(m: Measurement, model: str) -> str:
    mean = m.batches.get(model)
    return "-" if mean is None else f"{mean:.2f}"


def _load_table(loads: Sequence[Load], start_rss_mib: float) -> str:
    rows: list[list[object]] = [["(none)", "", "", "", "", "", "", f"{start_rss_mib:.0f}"]]
    for load in loads:
        rows.append(
            [
                load.name,
                load.seed,
                load.classes,
                f"{load.load_s:.2f}",
                f"{load.wall_s:.2f}",
                f"{load.memory_mb:.0f}",
                load.form,
                f"{load.rss_mib:.0f}",
            ]
        )
    header = [
        "model loaded",
        "seed",
        "classes",
        "loadSeconds (server)",
        "POST /models wall s",
        "memoryMB",
        "form",
        "server RSS after, MiB",
    ]
    return table(header, rows, labels=1)


def _unload_table(unloads: Sequence[Unload]) -> str:
    rows = [
        [
            u.name,
            f"{u.memory_mb:.0f}",
            f"{u.rss_before_mib:.0f}",
            f"{u.rss_after_mib:.0f}",
            f"{u.given_back_mib:.0f}",
        ]
        for u in unloads
    ]
    header = [
        "model unloaded",
        "memoryMB answered",
        "server RSS before, MiB",
        "after, MiB",
        "given back, MiB",
    ]
    return table(header, rows, labels=1)


def _busy(m: Measurement) -> str:
    return "" if min(m.host_cores, m.host_cores_after) >= QUIET_CORES else " (busy)"


def _throughput_table(runs: Sequence[Measurement]) -> str:
    baseline = runs[0].requests_per_s
    rows = [
        [
            m.setup,
            len(m.models),
            m.connections,
            len(m.answers),
            f"{m.requests_per_s:.1f}",
            f"{m.requests_per_s / baseline:.2f}",
            _ms(percentile(m.latencies(), 0.5)),
            _ms(percentile(m.latencies(), 0.99)),
            _batch(m, ""),
            sum(m.failures.values()),
            f"{m.host_cores:.2f} / {m.host_cores_after:.2f}{_busy(m)}",
        ]
        for m in runs
    ]
    header = [
        "server",
        "hot models",
        "connections",
        "requests",
        "req/s",
        "/ single model",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "not 200",
        "host cores before / after",
    ]
    return table(header, rows, labels=1)


def _per_model_table(runs: Sequence[Measurement]) -> str:
    rows = []
    for m in runs:
        for index, model in enumerate(m.models):
            latencies = m.latencies(model)
            rows.append(
                [
                    m.setup,
                    model,
                    m.connections_of(index),
                    len(latencies),
                    f"{len(latencies) / max(1, len(m.answers)):.1%}",
                    _ms(percentile(latencies, 0.5)),
                    _ms(percentile(latencies, 0.99)),
                    _batch(m, model),
                ]
            )
    header = [
        "server",
        "model",
        "connections",
        "requests",
        "share",
        "p50 ms",
        "p99 ms",
        "mean batch",
    ]
    return table(header, rows, labels=2)


def _fairness(m: Measurement) -> str:
    rates = m.per_connection()
    least, most = min(rates), max(rates)
    return (
        f"with {len(m.models)} hot, the least served model answered {least:.1f} requests per "
        f"connection, the most served {most:.1f} ({least / most:.0%} of it)"
    )


def _log_lines(lines: Sequence[str]) -> str:
    if not lines:
        return "The multi-model server logged no ERROR or WARNING line in the whole run."
    shown = "\n".join(lines[:20])
    more = f"\n({len(lines) - 20} more)" if len(lines) > 20 else ""
    return (
        f"The multi-model server logged these ERROR and WARNING lines:\n\n```\n{shown}{more}\n```"
    )


def _reload_line(loads: Sequence[Load], reload: tuple[Load, float]) -> str:
    again, before = reload
    (first,) = [load for load in loads if load.name == again.name]
    return (
        f"Then {again.name} was loaded again: memoryMB {again.memory_mb:.0f} (its first load: "
        f"{first.memory_mb:.0f}), loadSeconds {again.load_s:.2f}, and the server's RSS went from "
        f"{before:.0f} to {again.rss_mib:.0f} MiB ({again.rss_mib - before:+.0f})."
    )


def render(
    loads: Sequence[Load],
    unloads: Sequence[Unload],
    reload: tuple[Load, float],
    runs: Sequence[Measurement],
    method: Method,
) -> str:
    """The whole section: loads and memory, unloads, requests/s against one model, method.

    `reload` is a model loaded again after the unloads, and the server's RSS just before;
    `runs` are the single-model baseline first, then the multi-model loads."""
    total_mb = sum(load.memory_mb for load in loads)
    answered = sum(u.memory_mb for u in unloads)
    given_back = sum(u.given_back_mib for u in unloads)
    grown = loads[-1].rss_mib - method.start_rss_mib
    multi = runs[1:]
    failures = Counter[str]()
    for m in runs:
        failures.update(m.failures)
    first_failures = "".join(
        f"\n- {m.setup}: the first answer other than 200 was `{m.first_failure}`"
        for m in runs
        if m.first_failure
    )
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("fastapi", "uvicorn", "httpx", "psutil")
    )
    connections = runs[0].connections
    return f"""## Multi-model endpoint

One `serve` process with `SAGEMAKER_MULTI_MODEL=true` (otherwise default settings) loads
{len(loads)} different models one after another through `POST /models`, then serves them under
load; the baseline is a single-model server (`python -m container.serving`) on the first of the
same artifacts, in the precision the multi-model server chose for it, measured in the same run.
The models are seeded, randomly initialised ResNet-18s at 224 px with a 133-class head (the dog
dataset's breeds), saved in our artifact format with no int8 network, so `SERVE_PRECISION=auto`
times fp32 (and bf16, where the CPU has native bf16 units) for each model at load and serves the
faster.

### Loading: time and memory per model

Each load's `loadSeconds` and `memoryMB` are the server's answer (the resident memory the load
added, after its leftovers were freed); the wall time is the client's, of the whole
`POST /models`; the RSS is the server process's `VmRSS` (`/proc/PID/status`) once it answered.
The first row is the server with no model.

{_load_table(loads, method.start_rss_mib)}

The {len(loads)} models' memoryMB add up to {total_mb:.0f} MiB; the server's RSS grew by
{grown:.0f} MiB over the {len(loads)} loads. For comparison, the single-model server held
{method.single_rss_mib:.0f} MiB with its one model. Memory budget: {method.budget}.

### Unloading: memory given back

After the {len(loads)}-model load, `DELETE /models/{{name}}` for all but {len(multi[0].models)}
models, newest first; the RSS is read just before each DELETE and once it answered (the server
answers once it has dropped the model, collected garbage and trimmed the heap).

{_unload_table(unloads)}

The {len(unloads)} DELETEs answered {answered:.0f} MiB (the memoryMB of those models' loads);
the server's RSS fell by {given_back:.0f} MiB.

{_reload_line(loads, reload)}

### Requests/s with {" and ".join(str(len(m.models)) for m in multi)} models hot

{connections} closed-loop clients (threads, one keep-alive `httpx.Client` each: the next request as
soon as the last is answered) POST {method.photos} for {method.warm_up_s:g} s of warm-up and then
{runs[0].seconds:g} s that count; a request counts when it is answered inside those
{runs[0].seconds:g} s. Against the multi-model server connection *i* sends only to hot model
*i* mod N (`POST /models/{{name}}/invoke`), so a model the server served less than the others
would answer fewer requests: sending each request to the next model in turn would give every model
the same count whatever the server did. The single-model server gets the same load on
`/invocations`. The mean batch is the images per forward pass a request rode in, read from the
servers' log line per invocation (warm-up included). The host is checked before each
measurement: a 2-thread matmul must get {QUIET_CORES} cores (`bench/_serve_wrk.py`), else it
waits up to 3 minutes; it is checked again just after, and a row is marked busy when either check
found less.

{_throughput_table(runs)}

Per model: {"; ".join(_fairness(m) for m in multi)}.

{_per_model_table(multi)}

Answers other than 200: {counts(failures)}.{first_failures}

What the models answered for the same photo: {method.answers_alike}.

{_log_lines(method.server_log)}

### Method

- Single-model server: {method.single_about}.
- Multi-model server: `python serve` with `SAGEMAKER_BASE_DIR` (an empty `model/`),
  `SAGEMAKER_BIND_TO_PORT` and `SAGEMAKER_MULTI_MODEL=true`; each model loaded from its artifact
  folder (`{{"model_name": ..., "url": "/abs/path/to/folder"}}`). With no model it held
  {method.start_rss_mib:.0f} MiB.
- Clients, server and its decoder processes share the machine's cores.

### Machine

{machine()}
- {versions}

Reproduce with `make bench-multi-model`, which runs `{method.command}`."""
