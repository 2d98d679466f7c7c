"""The "Serving soak" section of docs/benchmarks.md and its verdicts, from what a run recorded."""

from __future__ import annotations

import importlib.metadata
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench._markdown import table
from bench._report import machine
from bench._soak_requests import KINDS
from container.serving.settings import MiB

__all__ = [
    "OVERLOADED",
    "PING_P99_MS",
    "RSS_GROWTH",
    "Answer",
    "Method",
    "Ping",
    "Rss",
    "SoakRun",
    "Verdict",
    "counts",
    "mib",
    "percentile",
    "render",
    "verdicts",
]

OVERLOADED = "503 overloaded"
"""The outcome of a 503 with Retry-After: allowed for any request, counted apart."""
PING_P99_MS = 100.0
"""The issue's bound on /ping's p99 latency, in every minute of the run."""
RSS_GROWTH = 0.10
"""RSS counts as flat when its end is at most this much above its peak in the first fifth of the
run: allocator arenas, caches and decoder processes settle in that time; a leak keeps going."""


@dataclass(frozen=True)
class Answer:
    """One request's fate: when it was answered, its kind, its outcome and latency."""

    at_s: float  # since the load started
    kind: int  # index into KINDS
    outcome: str  # "200", "503 overloaded", "transport: ReadError", ...
    latency_s: float


@dataclass(frozen=True)
class Ping:
    """One GET /ping."""

    at_s: float
    latency_s: float
    outcome: str


@dataclass(frozen=True)
class Rss:
    """The server's memory at one moment, alone and with all its descendants."""

    at_s: float
    server: int
    total: int
    children: frozenset[int]


@dataclass
class SoakRun:
    """What one run recorded; filled in while it runs."""

    answers: list[Answer] = field(default_factory=list)
    pings: list[Ping] = field(default_factory=list)
    rss: list[Rss] = field(default_factory=list)


@dataclass(frozen=True)
class Method:
    """How the run was made, for the document."""

    seconds: float
    connections: int
    ping_every_s: float
    sample_every_s: float
    max_retry_after_s: float
    request_timeout_s: float
    ping_timeout_s: float
    server: str  # what our server said about its setup
    requests: str  # `bench._soak_requests.describe`
    command: str


@dataclass(frozen=True)
class Verdict:
    """One pass criterion: its name, whether it was met, and what was measured."""

    name: str
    met: bool
    measured: str

    @property
    def line(self) -> str:
        return f"- {self.name}: **{'met' if self.met else 'NOT MET'}** ({self.measured})."


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def mib(value: int) -> str:
    """Bytes in whole MiB."""
    return f"{value / MiB:.0f}"


def counts(outcomes: Counter[str]) -> str:
    """`outcome: count` pairs, sorted by outcome."""
    return ", ".join(f"{o}: {n}" for o, n in sorted(outcomes.items())) or "none"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g} s"
    return f"{seconds / 60:g} minute{'' if seconds == 60 else 's'}"


def _failure(outcome: str) -> bool:
    """A 5xx other than 503 overloaded, or no answer at all: never allowed."""
    return outcome.startswith(("5", "transport")) and outcome != OVERLOADED


def _unexpected(answer: Answer) -> bool:
    outcome = answer.outcome
    if outcome == OVERLOADED:
        return False
    return not outcome.isdigit() or int(outcome) not in KINDS[answer.kind].expected


def _minutes(method: Method) -> int:
    return max(1, math.ceil(method.seconds / 60))


def _minute(at_s: float, method: Method) -> int:
    # The answers to requests still in flight at the end join the last minute.
    return min(int(at_s // 60), _minutes(method) - 1)


def _kind_table(run: SoakRun) -> str:
    rows = []
    for index, kind in enumerate(KINDS):
        answers = [a for a in run.answers if a.kind == index]
        latencies = [a.latency_s for a in answers]
        rows.append(
            [
                kind.name,
                kind.group,
                " or ".join(str(s) for s in sorted(kind.expected)),
                len(answers),
                counts(Counter(a.outcome for a in answers)),
                sum(_unexpected(a) for a in answers),
                _ms(percentile(latencies, 0.5)),
                _ms(percentile(latencies, 0.99)),
            ]
        )
    header = ["request", "kind", "expected", "sent", "answers", "unexpected", "p50 ms", "p99 ms"]
    return table(header, rows, labels=3)


def _minute_table(run: SoakRun, method: Method) -> str:
    rows = []
    for minute in range(_minutes(method)):
        answers = [a for a in run.answers if _minute(a.at_s, method) == minute]
        pings = [p.latency_s for p in run.pings if _minute(p.at_s, method) == minute]
        rss = [s for s in run.rss if _minute(s.at_s, method) == minute]
        length = min(60.0, method.seconds - 60 * minute)
        rows.append(
            [
                minute + 1,
                len(answers),
                f"{len(answers) / length:.1f}",
                sum(a.outcome == OVERLOADED for a in answers),
                sum(_unexpected(a) for a in answers),
                _ms(percentile(pings, 0.5)),
                _ms(percentile(pings, 0.99)),
                _ms(max(pings, default=math.nan)),
                mib(rss[-1].server) if rss else "-",
                mib(rss[-1].total) if rss else "-",
                len(rss[-1].children) if rss else "-",
            ]
        )
    header = [
        "minute",
        "requests",
        "req/s",
        "503 overloaded",
        "unexpected",
        "/ping p50 ms",
        "/ping p99 ms",
        "/ping max ms",
        "RSS server MiB",
        "RSS with children MiB",
        "children",
    ]
    return table(header, rows, labels=1)


def _rss_table(run: SoakRun) -> str:
    rows = []
    for name, values in (
        ("server", [s.server for s in run.rss]),
        ("server + children", [s.total for s in run.rss]),
    ):
        rows.append([name, mib(values[0]), mib(max(values)), mib(values[-1])])
    return table(["RSS MiB", "start", "peak", "end"], rows, labels=1)


def verdicts(run: SoakRun, method: Method) -> list[Verdict]:
    """The issue's three criteria, and a fourth: every answer is one `KINDS` expects."""
    settled = max(s.total for s in run.rss if s.at_s <= method.seconds / 5)
    end = run.rss[-1].total
    growth = end / settled - 1
    failures = Counter(a.outcome for a in run.answers if _failure(a.outcome))
    per_minute = [
        percentile([p.latency_s for p in run.pings if _minute(p.at_s, method) == m], 0.99)
        for m in range(_minutes(method))
    ]
    worst = max((p for p in per_minute if not math.isnan(p)), default=math.nan)
    bad_pings = Counter(p.outcome for p in run.pings if p.outcome != "200")
    unexpected = Counter(
        f"{KINDS[a.kind].name} -> {a.outcome}" for a in run.answers if _unexpected(a)
    )
    return [
        Verdict(
            "RSS stays flat",
            growth <= RSS_GROWTH,
            f"server + children {mib(end)} MiB at the end against {mib(settled)} MiB, the "
            f"peak of the first fifth: {growth:+.1%}, allowed {RSS_GROWTH:+.0%}",
        ),
        Verdict(
            "no 500",
            not failures,
            f"{sum(failures.values())} answers 5xx other than 503 overloaded or lost in transport"
            + (f": {counts(failures)}" if failures else ""),
        ),
        Verdict(
            f"/ping p99 under {PING_P99_MS:g} ms throughout",
            not math.isnan(worst) and worst * 1000 < PING_P99_MS and not bad_pings,
            f"worst minute's p99 {_ms(worst)} ms, {len(run.pings)} pings, not 200: "
            + counts(bad_pings),
        ),
        Verdict(
            "every answer as expected",
            not unexpected,
            f"{sum(unexpected.values())} unexpected"
            + (f": {counts(unexpected)}" if unexpected else ""),
        ),
    ]


def render(run: SoakRun, method: Method) -> str:
    """The whole section: verdicts, requests by kind, per minute, /ping and RSS, method, machine."""
    pings = [p.latency_s for p in run.pings]
    children = {pid for s in run.rss for pid in s.children}
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("fastapi", "uvicorn", "httpx", "psutil")
    )
    lines = "\n".join(v.line for v in verdicts(run, method))
    rate = len(run.answers) / method.seconds
    ping_ms = " / ".join(
        _ms(v)
        for v in (percentile(pings, 0.5), percentile(pings, 0.99), max(pings, default=math.nan))
    )
    return f"""## Serving soak

Our server (`python -m container.serving`, default settings) for {_duration(method.seconds)}
under {method.connections} keep-alive connections, each sending its next request as soon as the
last is answered: valid requests mixed with ones over its limits and hostile ones. Meanwhile a
separate process GETs `/ping` on a connection of its own every
{method.ping_every_s * 1000:.0f} ms, and the RSS of the server and of its child processes is read
every {method.sample_every_s:g} s. A 503 with Retry-After (overloaded) is allowed for any request
and counted apart; that connection then waits as long (at most {method.max_retry_after_s:g} s).

The issue's criteria, and whether every answer was the one expected:

{lines}

### Requests

{len(run.answers)} requests in {_duration(method.seconds)}, {rate:.1f} a second. By status:
{counts(Counter(a.outcome for a in run.answers))}.

{_kind_table(run)}

### Per minute

{_minute_table(run, method)}

### /ping and memory

- `/ping`: {len(pings)} probes; latency p50 / p99 / max: {ping_ms} ms; not 200:
  {counts(Counter(p.outcome for p in run.pings if p.outcome != "200"))}.
- Child processes of the server: {len(run.rss[0].children)} at the start,
  {len(run.rss[-1].children)} at the end, {len(children)} different ones seen (a replaced decoder
  counts again). RSS is VmRSS (psutil), summed: pages the processes share count in each.

{_rss_table(run)}

### Method

- Server: {method.server}.
{method.requests}
- Client: httpx, one `AsyncClient` with {method.connections} connections and a
  {method.request_timeout_s:g} s timeout; `/ping` from a blocking `httpx.Client` with a
  {method.ping_timeout_s:g} s timeout. Both share the machine with the server.

### Machine

{machine()}
- {versions}

Reproduce with `make bench-soak`, which runs `{method.command}`."""
