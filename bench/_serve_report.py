"""The "Serving throughput" section of docs/benchmarks.md, rendered from the measurements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from bench._markdown import table
from bench._report import machine
from bench._serve_model import BATCH_SIZES, ModelRun
from bench._serve_wrk import LoadResult

__all__ = ["Kind", "Method", "ServerResult", "render"]

Kind = Literal["ours", "forced", "naive", "torchserve"]
"""ours: our server with SERVE_PRECISION=auto (its default); forced: ours with one precision."""


@dataclass
class ServerResult:
    """One server configuration: its measurements per image size, or why it could not run."""

    name: str
    kind: Kind
    setup: str  # how it was configured, one sentence for the Method list
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)  # size label -> results
    unavailable: str | None = None
    precision: str | None = None  # ours: what it serves (forced, or what auto chose)

    def at(self, size: str, connections: int) -> LoadResult | None:
        return next((r for r in self.runs.get(size, []) if r.connections == connections), None)


@dataclass(frozen=True)
class Method:
    """What every server got, for the Method list."""

    photos: str  # the photos of each size, one line
    model: str  # the artifact, and its int8 network's gate, in words
    int8_gate: bool | None  # the int8 gate's own verdict; None: the artifact serves no int8
    connections: Sequence[int]
    seconds: float
    warm_up_s: float
    command: str
    versions: Sequence[tuple[str, str]]  # beyond those `machine()` lists


_TARGET_SIZE, _TARGET_CONNECTIONS = "1024x768", 16
_OVER_NAIVE, _OVER_NAIVE_INT8, _OVER_TORCHSERVE = 3.0, 5.0, 2.0
_FORCED_SLACK = 0.05  # auto at most this much slower than the best forced precision
_LARGE_SIZE, _OVER_NAIVE_LARGE = "3000x2000", 2.5  # an earlier issue's target


def _size_table(servers: Sequence[ServerResult], size: str) -> str:
    rows = []
    for server in servers:
        for r in server.runs.get(size, []):
            busy = "" if r.quiet else " (busy)"
            rows.append(
                [
                    server.name,
                    r.connections,
                    f"{r.requests_per_s:.1f}",
                    f"{r.p50_ms:.0f}",
                    f"{r.p99_ms:.0f}",
                    f"{r.host_cores:.2f}{busy}",
                    f"{r.load_1min:.2f}",
                ]
            )
    header = ["server", "connections", "req/s", "p50 ms", "p99 ms", "host cores", "load 1 min"]
    return table(header, rows, labels=1)


def _best(
    servers: Sequence[ServerResult], kind: Kind, size: str, connections: int
) -> tuple[ServerResult, LoadResult] | None:
    """The server of `kind` with the most req/s at this size and connection count."""
    found = [
        (s, r) for s in servers if s.kind == kind and (r := s.at(size, connections)) is not None
    ]
    return max(found, key=lambda pair: pair[1].requests_per_s, default=None)


def _ratios(servers: Sequence[ServerResult], sizes: Sequence[str], levels: Sequence[int]) -> str:
    rows = []
    for connections in levels:
        for size in sizes:
            ours = _best(servers, "ours", size, connections)
            if ours is None:
                continue
            mine = ours[1]
            row: list[object] = [size, connections, f"{mine.requests_per_s:.1f}"]
            for kind in ("naive", "torchserve"):
                other = _best(servers, kind, size, connections)
                if other is None:
                    row += ["-", "-"]
                    continue
                name, theirs = other[0].name, other[1]
                ratio = mine.requests_per_s / theirs.requests_per_s
                label = f" ({name})" if kind == "torchserve" else ""
                row += [f"**{ratio:.2f}x**{label}", f"{mine.p99_ms:.0f} / {theirs.p99_ms:.0f}"]
            rows.append(row)
    header = [
        "image",
        "connections",
        "auto req/s",
        "auto / naive",
        "p99 ms auto / naive",
        "auto / TorchServe's best",
        "p99 ms auto / TorchServe's best",
    ]
    return table(header, rows, labels=2)


def _shortfall(
    servers: Sequence[ServerResult], size: str, connections: int
) -> tuple[float, ServerResult, LoadResult, LoadResult] | None:
    """Auto's req/s over the best forced precision's here (1.0: as fast), that server, and both
    measurements."""
    auto, forced = (
        _best(servers, "ours", size, connections),
        _best(servers, "forced", size, connections),
    )
    if auto is None or forced is None:
        return None
    return auto[1].requests_per_s / forced[1].requests_per_s, forced[0], auto[1], forced[1]


def _auto_vs_forced(servers: Sequence[ServerResult], sizes: Sequence[str]) -> str | None:
    forced = [s for s in servers if s.kind == "forced" and s.runs]
    auto = next((s for s in servers if s.kind == "ours" and s.runs), None)
    if not forced or auto is None:
        return None
    rows = []
    for size in sizes:
        for run in auto.runs.get(size, []):
            row: list[object] = [size, run.connections, f"{run.requests_per_s:.1f}"]
            for server in forced:
                theirs = server.at(size, run.connections)
                row.append("-" if theirs is None else f"{theirs.requests_per_s:.1f}")
            found = _shortfall(servers, size, run.connections)
            row.append("-" if found is None else f"**{found[0]:.2f}x** ({found[1].precision})")
            rows.append(row)
    header = [
        "image",
        "connections",
        f"auto ({auto.precision or '?'}) req/s",
        *(f"{s.precision} req/s" for s in forced),
        "auto / best forced",
    ]
    return table(header, rows, labels=2)


def _verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


def _over(servers: Sequence[ServerResult], kind: Kind, size: str, at_least: float) -> list[str]:
    """A targets row: auto's req/s at least `at_least` times the best of `kind`, 16 connections."""
    what = "naive" if kind == "naive" else "TorchServe's best"
    target = f"auto >= {at_least:g}x {what}, {size}, {_TARGET_CONNECTIONS} connections"
    ours = _best(servers, "ours", size, _TARGET_CONNECTIONS)
    other = _best(servers, kind, size, _TARGET_CONNECTIONS)
    if ours is None or other is None:
        return [target, "not measured in this run", "-"]
    ratio = ours[1].requests_per_s / other[1].requests_per_s
    name = "" if kind == "naive" else f"{other[0].name}, "
    measured = (
        f"{ratio:.2f}x ({ours[1].requests_per_s:.1f} against {name}"
        f"{other[1].requests_per_s:.1f} req/s)"
    )
    return [target, measured, _verdict(ratio >= at_least)]


def _int8_row(servers: Sequence[ServerResult], gate: bool | None) -> list[str]:
    row = _over(servers, "naive", _TARGET_SIZE, _OVER_NAIVE_INT8)
    row[0] += ", where int8 passes its gate"
    if gate is None:
        return [row[0], "the artifact has no usable int8", "n/a"]
    if not gate:
        row[1] += (
            "; int8's gate failed on this random-weight model, which serves it anyway for speed "
            "(see Method)"
        )
    return row


def _p99_row(servers: Sequence[ServerResult]) -> list[str]:
    size, connections = _TARGET_SIZE, _TARGET_CONNECTIONS
    target = f"auto's p99 below naive's and TorchServe's best's, {size}, {connections} connections"
    ours = _best(servers, "ours", size, connections)
    others = [_best(servers, kind, size, connections) for kind in ("naive", "torchserve")]
    if ours is None or None in others:
        return [target, "not measured in this run", "-"]
    theirs = [pair[1].p99_ms for pair in others if pair is not None]
    measured = f"{ours[1].p99_ms:.0f} ms against {theirs[0]:.0f} and {theirs[1]:.0f} ms"
    return [target, measured, _verdict(all(ours[1].p99_ms < t for t in theirs))]


def _forced_row(
    servers: Sequence[ServerResult], sizes: Sequence[str], levels: Sequence[int]
) -> list[str]:
    target = (
        f"auto at most {_FORCED_SLACK:.0%} slower than the best forced precision, every size and "
        "connection count"
    )
    found = [(size, c, f) for size in sizes for c in levels if (f := _shortfall(servers, size, c))]
    if not found:
        return [target, "not measured in this run", "-"]
    size, connections, (ratio, server, auto, best) = min(found, key=lambda each: each[2][0])
    measured = (
        f"worst: {size}, {connections} connections: {auto.requests_per_s:.1f} req/s against "
        f"{server.precision}'s {best.requests_per_s:.1f} ({100 * (ratio - 1):+.1f} %)"
    )
    if next((s.precision for s in servers if s.kind == "ours"), None) == server.precision:
        measured += (
            f"; auto served {server.precision} too, so the two are one configuration run twice "
            "and the gap is run-to-run variance, not the choice"
        )
    return [target, measured, _verdict(ratio >= 1 - _FORCED_SLACK)]


def _latency_row(servers: Sequence[ServerResult], sizes: Sequence[str]) -> list[str]:
    target = "auto's p50 no worse than naive's at 1 connection (earlier target)"
    parts, worse = [], 0
    for size in sizes:
        ours, naive = _best(servers, "ours", size, 1), _best(servers, "naive", size, 1)
        if ours is None or naive is None:
            continue
        parts.append(f"{size} {ours[1].p50_ms:.0f} / {naive[1].p50_ms:.0f} ms")
        worse += ours[1].p50_ms > naive[1].p50_ms
    if not parts:
        return [target, "not measured in this run", "-"]
    return [target, ", ".join(parts), _verdict(not worse)]


def _targets(
    servers: Sequence[ServerResult], sizes: Sequence[str], levels: Sequence[int], gate: bool | None
) -> str:
    large = _over(servers, "naive", _LARGE_SIZE, _OVER_NAIVE_LARGE)
    large[0] += " (earlier target)"
    rows = [
        _over(servers, "naive", _TARGET_SIZE, _OVER_NAIVE),
        _int8_row(servers, gate),
        _over(servers, "torchserve", _TARGET_SIZE, _OVER_TORCHSERVE),
        _p99_row(servers),
        _forced_row(servers, sizes, levels),
        large,
        _latency_row(servers, sizes),
    ]
    return table(["target", "measured", "verdict"], rows, labels=2)


def _model_table(run: ModelRun) -> str:
    baseline = next((f for f in run.forms if f.name == "eager fp32" and f.images_per_s), None)
    rows = []
    for form in run.forms:
        if form.unavailable:
            rows.append(
                [form.name, f"not measured: {form.unavailable}", *["-"] * (len(BATCH_SIZES) + 1)]
            )
            continue
        speeds = [f"{form.images_per_s[size]:.1f}" for size in BATCH_SIZES]
        largest = BATCH_SIZES[-1]
        gain = (
            f"{form.images_per_s[largest] / baseline.images_per_s[largest]:.2f}x"
            if baseline is not None
            else "-"
        )
        rows.append([form.name, form.form, *speeds, gain])
    header = [
        "precision",
        "runs as",
        *(f"batch {size} img/s" for size in BATCH_SIZES),
        f"batch {BATCH_SIZES[-1]} / eager fp32",
    ]
    return table(header, rows, labels=2)


def _setups(servers: Sequence[ServerResult]) -> str:
    lines = []
    for s in servers:
        state = f" **Not measured: {s.unavailable}**" if s.unavailable else ""
        lines.append(f"- {s.name}: {s.setup}{state}")
    return "\n".join(lines)


def render(
    servers: Sequence[ServerResult], sizes: Sequence[str], method: Method, model: ModelRun
) -> str:
    """The whole section: tables per image size, ratios, targets, model-only speed, method and
    machine."""
    levels = sorted({min(method.connections), max(method.connections)}, reverse=True)
    tables = "\n\n".join(f"### {size}\n\n{_size_table(servers, size)}" for size in sizes)
    *most, last = (str(c) for c in method.connections)
    connections = f"{', '.join(most)} and {last}" if most else last
    versions = "\n".join(f"- {name}: {value}" for name, value in method.versions)
    forced = _auto_vs_forced(servers, sizes)
    forced_part = (
        f"\n\nAuto against each precision forced (req/s; its choice in the header):\n\n{forced}"
        if forced
        else ""
    )
    batches = " and ".join(map(str, BATCH_SIZES))
    return f"""## Serving throughput

Requests per second and latency of HTTP servers classifying the same JPEG photos with the same
ResNet-18 weights (133 classes) on this CPU, one server at a time: our server
(`python -m container.serving`) with its default `SERVE_PRECISION=auto` and with each precision
forced (`fp32`, `bf16`, `int8`), a plain FastAPI server written the way most first versions are
(`bench/naive_server.py`), and TorchServe with its built-in `image_classifier` handler. Each POST
carries one JPEG (`Content-Type: image/jpeg`) and gets the top 5 classes back. Load: `wrk`,
{connections} keep-alive connections, each sending its next request when the last is answered;
{method.seconds:g} s per measurement.

{tables}

Auto against the others (req/s ratio; p99 latency side by side):

{_ratios(servers, sizes, levels)}{forced_part}

The targets, as measured in this run (ratios of this run's own numbers):

{_targets(servers, sizes, method.connections, method.int8_gate)}

### The model alone

Images/s of the network as the server runs it, without HTTP or decoding: our server's own
`Predictor` (`container/serving/predictor.py`) on the same artifact, `predict` on lists of
224x224 uint8 crops at batch {batches}, {model.threads} torch threads (one per core, as the
server), each form warmed up and then timed for {model.seconds:g} s per batch size in
{model.rounds} interleaved rounds (the median round counts); host cores before timing:
{model.host_cores:.2f}. "eager fp32" is the plain module (`optimize="eager"`), the others the
traced and frozen TorchScript the server builds (`optimize="jit"`).

{_model_table(model)}

### Method

- Photos: {method.photos}; wrk sends them in turn on every connection.
- Model: {method.model}
{_setups(servers)}
- Per server and image size: a {method.warm_up_s:g} s warm-up with
  {max(method.connections)} connections, then one measurement per connection count. Every
  answer must be 200 (the wrk script counts the others, and any socket error or timeout fails
  the run); wrk's timeout is 60 s, so slow answers stay in the percentiles.
- Servers run one at a time, wrk with one thread on the same 2 cores (it uses a few percent of
  one). Before each warm-up and measurement a 2-thread matmul must get at least 1.5 cores
  ("host cores"; 2.0 on a quiet host), else the run waits (up to 3 minutes; the row is then
  marked "busy"): this also lets a server finish the requests still queued from the previous
  load. The 1-minute load average is recorded too, but it also counts the benchmark's
  own previous measurement, so it is not the gate.
- Targets: "TorchServe's best" is the TorchServe variant with the most req/s at that size and
  connection count; "best forced" likewise among our server's forced precisions. Verdicts are
  computed from this run's numbers and are not asserted by any test.

### Machine

{machine()}
{versions}

Reproduce with `make bench-serve`, which runs `{method.command}`."""
