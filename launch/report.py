"""`launch report`: one HTML page about one training job.

At the top, the job's own verdicts, which every job has: the rules it evaluated itself
(evaluation.json "rules") and its profiler findings (profile.json "findings"), unpacked with its
other reports from its output.tar.gz beside the page and linked from it. Then the Debugger service's
rule statuses (DescribeTrainingJob), which only accounts that still have Debugger get, the metrics
over time (CloudWatch, through `TrainingJobAnalytics`) and, when smdebug tensors can be read (the
service hook's S3 output, or the job's own in output.tar.gz's debug-tensors/), an smdebug trial
analysis: loss curves per mode, gradient norms per layer, what looks wrong in them, and Debugger's
built-in rules run here on them (launch/tensor_rules.py). Plots are PNGs embedded as base64, so the
page is a single file.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from matplotlib.figure import Figure

from container import html_page
from container.sagemaker_env import (
    DEBUG_TENSORS,
    EVALUATION_HTML,
    EVALUATION_JSON,
    PROFILE_HTML,
    PROFILE_JSON,
)
from container.training.metrics import METRIC_NAMES
from launch.aws import Aws, console_url
from launch.settings import Common

if TYPE_CHECKING:
    from launch.tensor_rules import TensorVerdict

__all__ = ["HELP", "DebugAnalysis", "add_arguments", "analyse_debug_output", "run"]

HELP = "Write one HTML report of a training job: its rule verdicts, metrics, tensors."

VANISHING = 1e-7
"""A gradient L2 norm below this is 'vanished' (the vanishing_gradient rule's threshold)."""

GRADIENT_LAYERS_PLOTTED = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="the training job's name")
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="the page (default: %(default)s)"
    )
    parser.add_argument(
        "--debug-path",
        help="the Debugger output: a local folder or s3:// URI (default: the job's own)",
    )


@dataclass
class DebugAnalysis:
    """What the trial holds, reduced to what the page shows."""

    path: str
    steps: dict[str, int] = field(default_factory=dict)
    losses: dict[str, dict[int, float]] = field(default_factory=dict)  # mode -> step -> loss
    gradient_norms: dict[str, dict[int, float]] = field(default_factory=dict)  # layer -> ...
    findings: list[str] = field(default_factory=list)
    rules: list[TensorVerdict] = field(default_factory=list)  # Debugger's built-ins, run here


def analyse_debug_output(path: str) -> DebugAnalysis:
    """Read an smdebug output folder (local or S3) with the trial API, and run Debugger's
    built-in rules on it (launch/tensor_rules.py). ImportError without smdebug or torch."""
    # smdebug.trials imports torch (through smdebug.core's framework checks); `launch` must not
    # pay for torch on every command, so it is imported here, only when a report reads tensors.
    # smdebug logs INFO lines to stdout through a handler made at import: bound to stderr here,
    # so that stdout carries only the report's lines.
    with contextlib.redirect_stdout(sys.stderr):
        from smdebug import modes
        from smdebug.trials import create_trial

        from launch import tensor_rules

    trial = create_trial(path)
    result = DebugAnalysis(path)
    for mode in (modes.TRAIN, modes.EVAL):
        result.steps[mode.name] = len(trial.steps(mode=mode))
    for name in trial.tensor_names(collection="losses"):
        tensor = trial.tensor(name)
        for mode in (modes.TRAIN, modes.EVAL):
            steps = tensor.steps(mode=mode)
            if steps:
                key = f"{name} ({mode.name})"
                result.losses[key] = {s: float(tensor.value(s, mode=mode)) for s in steps}
    for name in trial.tensor_names(collection="gradients"):
        tensor = trial.tensor(name)
        steps = tensor.steps(mode=modes.TRAIN)
        # The full gradient where the service's hook saved it, its "l2" reduction where the
        # job's own did (save_tensors).
        norms = {
            s: norm
            for s in steps
            if (norm := tensor_rules.l2_norm(tensor, s, modes.TRAIN)) is not None
        }
        if norms:
            result.gradient_norms[name.removeprefix("gradient/")] = norms
    result.findings = findings(result)
    result.rules = tensor_rules.evaluate(trial)
    return result


def findings(analysis: DebugAnalysis) -> list[str]:
    """What the tensors show that a rule would flag: losses that do not fall, gradients that
    vanish or explode."""
    notes = []
    for name, curve in analysis.losses.items():
        values = [curve[s] for s in sorted(curve)]
        if any(not math.isfinite(v) for v in values):
            notes.append(f"{name}: non-finite loss")
        elif "TRAIN" in name and len(values) >= 4:
            quarter = max(1, len(values) // 4)
            first = sum(values[:quarter]) / quarter
            last = sum(values[-quarter:]) / quarter
            if last >= first:
                notes.append(f"{name}: not decreasing ({first:.4f} -> {last:.4f})")
    for layer, norms in analysis.gradient_norms.items():
        values = list(norms.values())
        if values and max(values) < VANISHING:
            notes.append(f"gradient of {layer}: vanishing (max L2 norm {max(values):.2e})")
        elif any(not math.isfinite(v) for v in values):
            notes.append(f"gradient of {layer}: non-finite")
    return notes


def _curves(curves: Mapping[str, Mapping[Any, float]], title: str, log: bool = False) -> str:
    figure = Figure(figsize=(8, 4))
    axes = figure.subplots()
    for label, curve in curves.items():
        xs = sorted(curve)
        axes.plot(xs, [curve[x] for x in xs], marker=".", label=label)
    axes.set_title(title)
    if log:
        axes.set_yscale("log")
    axes.legend(fontsize="small")
    return html_page.figure(figure, title)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Cells as given, text: the job's numbers come already formatted."""
    return html_page.table(header, [[str(c) for c in row] for row in rows])


def _rules_section(description: Mapping[str, Any]) -> tuple[str, list[str]]:
    statuses = description.get("DebugRuleEvaluationStatuses") or []
    configured = [
        r["RuleConfigurationName"] for r in description.get("DebugRuleConfigurations", [])
    ]
    if not statuses:
        line = (
            f"no rule evaluation statuses reported yet (configured: {', '.join(configured)})"
            if configured
            else "no Debugger rules configured for this job"
        )
        return html_page.paragraph(line), [line]
    rows = [
        (s["RuleConfigurationName"], s.get("RuleEvaluationStatus", "?"), s.get("StatusDetails", ""))
        for s in statuses
    ]
    lines = [
        f"rule {name}: {status}" + (f" ({details})" if details else "")
        for name, status, details in rows
    ]
    return _table(("rule", "status", "details"), rows), lines


def _metrics_section(aws: Aws, job: str) -> tuple[str, list[str]]:
    from sagemaker.analytics import TrainingJobAnalytics

    try:
        frame = TrainingJobAnalytics(
            job, metric_names=list(METRIC_NAMES), sagemaker_session=aws.sagemaker
        ).dataframe()
    except (ClientError, KeyError, ValueError) as exc:
        line = f"metrics over time unavailable: CloudWatch did not answer ({exc})"
        return html_page.paragraph(line), [line]
    if frame.empty:
        line = (
            "metrics over time unavailable: CloudWatch holds no /aws/sagemaker/TrainingJobs "
            "datapoints for this job"
        )
        return html_page.paragraph(line), [line]
    curves: dict[str, dict[float, float]] = {}
    for row in frame.itertuples():
        curves.setdefault(str(row.metric_name), {})[float(row.timestamp)] = float(row.value)
    losses = {k: v for k, v in curves.items() if k.endswith("loss")}
    accuracies = {k: v for k, v in curves.items() if k.endswith(("acc", "top5"))}
    plots = [_curves(c, t) for c, t in ((losses, "losses (s)"), (accuracies, "accuracy (s)")) if c]
    return "".join(plots), [f"metrics: {len(frame)} datapoints of {', '.join(sorted(curves))}"]


def _missing(aws: Aws, path: str) -> str | None:
    """Why smdebug cannot read `path` yet, or None. Its trial waits forever for a collections
    file that is not there, so this looks first."""
    if not path.startswith("s3://"):
        return None if (Path(path) / "collections").is_dir() else "no collections/ folder in it"
    bucket, _, key = path.removeprefix("s3://").partition("/")
    prefix = key.rstrip("/") + "/collections/"
    try:
        listing = aws.boto.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as exc:
        return f"S3 said {exc.response['Error'].get('Code')}"
    return None if listing.get("KeyCount", 0) else "nothing uploaded under collections/ yet"


def _debug_section(aws: Aws, path: str | None) -> tuple[str, list[str]]:
    if path is None:
        line = (
            "no Debugger output: the job has no DebugHookConfig, no debug-tensors/ in its "
            "output.tar.gz, and no --debug-path was given"
        )
        return html_page.paragraph(line), [line]
    why = _missing(aws, path)
    if why:
        line = f"Debugger output at {path} not readable: {why}"
        return html_page.paragraph(line), [line]
    try:
        analysis = analyse_debug_output(path)
    except ImportError as exc:  # a laptop install: launch without the image's libraries
        line = (
            f"tensors at {path} not analysed: the analysis needs `pip install smdebug torch` "
            f"({exc})"
        )
        return html_page.paragraph(line), [line]
    except Exception as exc:  # smdebug raises its own and botocore's errors; any means unreachable
        line = f"Debugger output at {path} unreadable: {type(exc).__name__}: {exc}"
        return html_page.paragraph(line), [line]
    if not analysis.losses and not analysis.gradient_norms:
        line = f"Debugger output at {path} holds no losses or gradients yet"
        return html_page.paragraph(line), [line]
    parts = [f"<p>from {html.escape(path)}: steps {html.escape(str(analysis.steps))}</p>"]
    if analysis.losses:
        parts.append(_curves(analysis.losses, "loss per step, by mode"))
        loss_rows = [
            (name, len(c), f"{c[min(c)]:.4f}", f"{c[max(c)]:.4f}", f"{min(c.values()):.4f}")
            for name, c in analysis.losses.items()
        ]
        parts.append(_table(("loss (mode)", "steps", "first", "last", "lowest"), loss_rows))
    if analysis.gradient_norms:
        top = sorted(
            analysis.gradient_norms, key=lambda k: -max(analysis.gradient_norms[k].values())
        )[:GRADIENT_LAYERS_PLOTTED]
        parts.append(
            _curves({k: analysis.gradient_norms[k] for k in top}, "gradient L2 norm", log=True)
        )
        rows = [
            (layer, f"{min(n.values()):.3e}", f"{max(n.values()):.3e}", len(n))
            for layer, n in sorted(analysis.gradient_norms.items())
        ]
        parts.append(_table(("layer", "min norm", "max norm", "steps"), rows))
    notes = analysis.findings or ["nothing flagged in losses or gradients"]
    parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append(
        "<p>Debugger's built-in rules, run here on these tensors with smdebug's rule API:</p>"
    )
    rules = [
        (r.name, r.status, "" if r.step is None else str(r.step), r.message) for r in analysis.rules
    ]
    parts.append(_table(("rule", "status", "step", "message"), rules))
    lines = [
        f"debugger: {len(analysis.losses)} loss curves, "
        f"{len(analysis.gradient_norms)} layers with gradients"
    ] + [f"flagged: {n}" for n in analysis.findings]
    return "".join(parts), lines + [_rule_line("smdebug rule", *row) for row in rules]


_JOB_REPORTS = (EVALUATION_HTML, EVALUATION_JSON, PROFILE_HTML, PROFILE_JSON)
"""What `train` writes to /opt/ml/output/data, which SageMaker tars into output.tar.gz."""


@dataclass(frozen=True)
class JobOutput:
    """What the job's output.tar.gz held, unpacked into `folder`; `missing` says why not."""

    folder: Path
    reports: list[str]
    tensors: Path | None
    missing: str | None = None


def _unpack_job_output(aws: Aws, description: Mapping[str, Any], folder: Path) -> JobOutput:
    """The job's own reports and tensors, from its output.tar.gz into `folder`."""
    output = description["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    uri = f"{output}/{description['TrainingJobName']}/output/output.tar.gz"
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    archive = folder / "output.tar.gz"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        aws.boto.client("s3").download_file(bucket, key, str(archive))
    except ClientError:
        return JobOutput(folder, [], None, f"no {uri} (yet)")
    try:
        with tarfile.open(archive) as tar:
            wanted = [m for m in tar.getmembers() if _wanted(m.name.removeprefix("./"))]
            tar.extractall(folder, members=wanted, filter="data")  # no path leaves `folder`
    except (tarfile.TarError, OSError) as exc:
        return JobOutput(folder, [], None, f"{uri} unreadable: {exc}")
    finally:
        archive.unlink()
    tensors = folder / DEBUG_TENSORS
    found = [name for name in _JOB_REPORTS if (folder / name).is_file()]
    return JobOutput(folder, found, tensors if tensors.is_dir() else None)


def _wanted(name: str) -> bool:
    return name in _JOB_REPORTS or name.startswith(f"{DEBUG_TENSORS}/")


def _job_reports_section(unpacked: JobOutput) -> tuple[str, list[str]]:
    """Links to the job's own reports, its accuracy per split and its evaluation's findings."""
    if unpacked.missing:
        line = f"the job's own reports: {unpacked.missing}"
        return html_page.paragraph(line), [line]
    folder, found = unpacked.folder, unpacked.reports
    links = " ".join(f'<a href="{html.escape(f"{folder.name}/{n}")}">{n}</a>' for n in found)
    parts, lines = [f"<p>{links or 'none in output.tar.gz'}</p>"], [f"job reports -> {folder}/"]
    if EVALUATION_JSON in found:
        evaluation = json.loads((folder / EVALUATION_JSON).read_text())
        rows = [
            (split, v["images"], f"{v['accuracy']:.4f}", f"{v['top5']:.4f}", f"{v['loss']:.4f}")
            for split, v in evaluation["splits"].items()
        ]
        parts.append(_table(("split", "images", "accuracy", "top-5", "loss"), rows))
        lines += [f"{split}: accuracy {acc}" for split, _, acc, _, _ in rows]
        # What is good, weak, to try: calibration and abstention included (older jobs: none).
        said = [(f["kind"], f["text"]) for f in evaluation.get("findings", [])]
        if said:
            parts.append(_table(("", "the evaluation's findings"), said))
            lines += [f"{kind}: {text}" for kind, text in said]
    return "".join(parts), lines


_QUIET = frozenset({"ok", "not_evaluated"})
"""Verdict statuses that are not a rule or finding firing."""


def _verdicts_section(unpacked: JobOutput) -> tuple[str, list[str]]:
    """The job's own verdicts: evaluation.json's "rules" and profile.json's "findings", as
    tables; a line for each that fired."""
    parts: list[str] = []
    lines: list[str] = []
    sources = (
        (EVALUATION_JSON, "rules", "rule", ("rule", "status", "step", "message")),
        (PROFILE_JSON, "findings", "finding", ("finding", "verdict", "message", "what to do")),
    )
    for file, key, kind, header in sources:
        path = unpacked.folder / file
        entries = json.loads(path.read_text()).get(key) if path.is_file() else None
        if not isinstance(entries, list):
            why = f"{file} has no {key!r}" if path.is_file() else f"no {file}"
            line = f"the job's own {key}: none ({why})"
            parts.append(html_page.paragraph(line))
            lines.append(line)
            continue
        rows = [_verdict_row(kind, entry) for entry in entries]
        parts.append(_table(header, rows))
        fired = [row for row in rows if row[1] not in _QUIET]
        lines.append(f"the job's own {key}: {len(fired)} of {len(rows)} fired")
        lines += [
            _rule_line("job rule", *row) if kind == "rule" else _finding_line(*row) for row in fired
        ]
    return "".join(parts), lines


def _verdict_row(kind: str, entry: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(name, status, step, message) of a rule; (name, verdict, message, recommendation) of a
    finding, whose status profile.json calls its verdict."""
    name = str(entry.get("name", "?"))
    status = str(entry.get("status", entry.get("verdict", "?")))
    if kind == "rule":
        step = entry.get("step")
        return name, status, "" if step is None else str(step), str(entry.get("message", ""))
    return name, status, str(entry.get("message", "")), str(entry.get("recommendation", ""))


def _rule_line(label: str, name: str, status: str, step: str, message: str) -> str:
    return f"{label} {name}: {status}" + (f" at step {step}" if step else "") + f": {message}"


def _finding_line(name: str, status: str, message: str, recommendation: str) -> str:
    return f"job finding {name}: {status}: {message}" + (
        f" ({recommendation})" if recommendation else ""
    )


def _default_debug_path(description: Mapping[str, Any]) -> str | None:
    hook = description.get("DebugHookConfig")
    if not hook:
        return None
    # SageMaker uploads the hook's LocalPath to S3OutputPath/<job>/debug-output.
    return f"{hook['S3OutputPath'].rstrip('/')}/{description['TrainingJobName']}/debug-output"


def run(args: argparse.Namespace, common: Common) -> int:
    aws = Aws.connect(common)
    description = aws.sagemaker.sagemaker_client.describe_training_job(TrainingJobName=args.job)
    status = description["TrainingJobStatus"]
    unpacked = _unpack_job_output(
        aws, description, args.out.with_name(f"{args.out.stem}-{args.job}")
    )
    reports_html, report_lines = _job_reports_section(unpacked)
    verdicts_html, verdict_lines = _verdicts_section(unpacked)
    rules_html, rule_lines = _rules_section(description)
    metrics_html, metric_lines = _metrics_section(aws, args.job)
    tensors = str(unpacked.tensors) if unpacked.tensors else _default_debug_path(description)
    debug_html, debug_lines = _debug_section(aws, args.debug_path or tensors)
    final = [(m["MetricName"], m["Value"]) for m in description.get("FinalMetricDataList", [])]
    link = console_url(aws.region, "jobs", args.job)
    page = html_page.page(
        f"Training job {args.job}",
        f"<p>status {html.escape(status)} {html.escape(description.get('FailureReason', ''))}"
        f' - <a href="{html.escape(link)}">console</a></p>',
        html_page.section("The job's own verdicts", verdicts_html),
        html_page.section("Debugger rules (the service)", rules_html),
        html_page.section("Final metrics", _table(("metric", "value"), final)),
        html_page.section("The job's own reports", reports_html),
        html_page.section("Metrics over time", metrics_html),
        html_page.section("Tensors (smdebug)", debug_html),
    )
    args.out.write_text(page)
    print(f"training job {args.job}: {status}")
    for line in report_lines + verdict_lines + rule_lines + metric_lines + debug_lines:
        print(line)
    print(f"report -> {args.out}")
    return 0
