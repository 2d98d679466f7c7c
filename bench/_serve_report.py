"""The "Serving throughput" section of docs/benchmarks.md, rendered from the measurements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from bench._markdown import table
from bench._report import machine
from bench._serve_wrk import LoadResult

__all__ = ["Method", "ServerResult", "render"]

Kind = Literal["ours", "naive", "torchserve"]


@dataclass
class ServerResult:
    """One server configuration: its measurements per image size, or why it could not run."""

    name: str
    kind: Kind
    setup: str  # how it was configured, one sentence for the Method list
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)  # size label -> results
    unavailable: str | None = None

    def at(self, size: str, connections: int) -> LoadResult | None:
        return next((r for r in self.runs.get(size, []) if r.connections == connections), None)


@dataclass(frozen=True)
class Method:
    """What every server got, for the Method list."""

    photos: str  # the photos of each size, one line
    connections: Sequence[int]
    seconds: float
    warm_up_s: float
    command: str
    versions: Sequence[tuple[str, str]]  # beyond those `machine()` lists


@dataclass(frozen=True)
class _Target:
    size: str
    connections: int
    baseline: Literal["naive", "torchserve"]
    at_least: float  # ours' req/s over the baseline's
    lower_p99: bool


_TARGETS = (
    _Target("1024x768", 16, "naive", 3.0, False),
    _Target("1024x768", 16, "torchserve", 1.5, True),
    _Target("3000x2000", 16, "naive", 2.5, False),
)


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
        "ours req/s",
        "ours / naive",
        "p99 ms ours / naive",
        "ours / TorchServe's best",
        "p99 ms ours / TorchServe's best",
    ]
    return table(header, rows, labels=2)


def _target_line(servers: Sequence[ServerResult], target: _Target) -> str | None:
    ours = _best(servers, "ours", target.size, target.connections)
    other = _best(servers, target.baseline, target.size, target.connections)
    if ours is None or other is None:
        return None
    ratio = ours[1].requests_per_s / other[1].requests_per_s
    met = ratio >= target.at_least
    line = (
        f"- {target.size}, {target.connections} connections: ours {ratio:.2f}x {other[0].name} "
        f"(target at least {target.at_least:g}x: {'met' if met else 'not met'})"
    )
    if target.lower_p99:
        lower = ours[1].p99_ms < other[1].p99_ms
        line += (
            f"; p99 {ours[1].p99_ms:.0f} ms against {other[1].p99_ms:.0f} ms "
            f"(target lower: {'met' if lower else 'not met'})"
        )
    return line + "."


def _latency_line(servers: Sequence[ServerResult], sizes: Sequence[str]) -> str | None:
    parts, worse = [], 0
    for size in sizes:
        ours, naive = _best(servers, "ours", size, 1), _best(servers, "naive", size, 1)
        if ours is None or naive is None:
            continue
        parts.append(f"{size} {ours[1].p50_ms:.0f} / {naive[1].p50_ms:.0f}")
        worse += ours[1].p50_ms > naive[1].p50_ms
    if not parts:
        return None
    verdict = "met" if not worse else f"not met at {worse} size(s)"
    return (
        f"- 1 connection, p50 ms ours / naive: {', '.join(parts)} "
        f"(target no worse than naive: {verdict})."
    )


def _targets(servers: Sequence[ServerResult], sizes: Sequence[str]) -> str:
    lines = [_target_line(servers, t) for t in _TARGETS] + [_latency_line(servers, sizes)]
    return "\n".join(line for line in lines if line is not None) or "- (not measured in this run)"


def _setups(servers: Sequence[ServerResult]) -> str:
    lines = []
    for s in servers:
        state = f" **Not measured: {s.unavailable}**" if s.unavailable else ""
        lines.append(f"- {s.name}: {s.setup}{state}")
    return "\n".join(lines)


def render(servers: Sequence[ServerResult], sizes: Sequence[str], method: Method) -> str:
    """The whole section: tables per image size, ratios, targets, method and machine."""
    levels = sorted({min(method.connections), max(method.connections)}, reverse=True)
    tables = "\n\n".join(f"### {size}\n\n{_size_table(servers, size)}" for size in sizes)
    *most, last = (str(c) for c in method.connections)
    connections = f"{', '.join(most)} and {last}" if most else last
    versions = "\n".join(f"- {name}: {value}" for name, value in method.versions)
    return f"""## Serving throughput

Requests per second and latency of three HTTP servers classifying the same JPEG photos with the
same ResNet-18 weights (133 classes) on this CPU, one server at a time: our server
(`python -m container.serving`, default settings), a plain FastAPI server written the way most
first versions are (`bench/naive_server.py`), and TorchServe with its built-in
`image_classifier` handler. Each POST carries one JPEG (`Content-Type: image/jpeg`) and gets the
top 5 classes back. Load: `wrk`, {connections} keep-alive connections, each sending its next
request when the last is answered; {method.seconds:g} s per measurement.

{tables}

Ours against the others (req/s ratio; p99 latency side by side):

{_ratios(servers, sizes, levels)}

The project's targets, as measured here:

{_targets(servers, sizes)}

### Method

- Photos: {method.photos}; wrk sends them in turn on every connection.
- Model: a seeded, randomly initialised ResNet-18 with a 133-class head, saved once in our
  artifact format (`bench/_serve_fixtures.py`); every server loads that `model.pt`.
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

### Machine

{machine()}
{versions}

Reproduce with `make bench-serve`, which runs `{method.command}`."""
