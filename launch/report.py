"""`launch report`: one HTML page about one training job.

It holds the Debugger rules' verdicts (DescribeTrainingJob), the metrics over time (CloudWatch,
through `TrainingJobAnalytics`) and, when the Debugger output can be read, an smdebug trial
analysis: loss curves per mode, gradient norms per layer, and what looks wrong in them. Plots are
PNGs embedded as base64, so the page is a single file. The job's own reports (evaluation and
profile, from its output.tar.gz) are unpacked beside the page and linked from it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import json
import math
import sys
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
from botocore.exceptions import ClientError
from matplotlib.figure import Figure

from container.training.metrics import METRIC_NAMES
from launch.aws import Aws, console_url
from launch.settings import Common

__all__ = ["HELP", "DebugAnalysis", "add_arguments", "analyse_debug_output", "run"]

HELP = "Write one HTML report of a training job: Debugger rules, metrics, tensors."

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


def analyse_debug_output(path: str) -> DebugAnalysis:
    """Read an smdebug output folder (local or S3) with the trial API."""
    # smdebug.trials imports torch (through smdebug.core's framework checks); `launch` must not
    # pay for torch on every command, so it is imported here, only when a report reads tensors.
    # smdebug logs INFO lines to stdout through a handler made at import: bound to stderr here,
    # so that stdout carries only the report's lines.
    with contextlib.redirect_stdout(sys.stderr):
        from smdebug import modes
        from smdebug.trials import create_trial

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
        norms = {s: float(_l2(tensor.value(s, mode=modes.TRAIN))) for s in steps}
        if norms:
            result.gradient_norms[name.removeprefix("gradient/")] = norms
    result.findings = findings(result)
    return result


def _l2(value: Any) -> float:
    return math.sqrt(float((value.astype("float64") ** 2).sum()))


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


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _curves(curves: Mapping[str, Mapping[Any, float]], title: str, log: bool = False) -> str:
    figure, axes = plt.subplots(figsize=(8, 4))
    for label, curve in curves.items():
        xs = sorted(curve)
        axes.plot(xs, [curve[x] for x in xs], marker=".", label=label)
    axes.set_title(title)
    if log:
        axes.set_yscale("log")
    axes.legend(fontsize="small")
    return _png(figure)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


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
        return f"<p>{html.escape(line)}</p>", [line]
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
        return f"<p>{html.escape(line)}</p>", [line]
    if frame.empty:
        line = (
            "metrics over time unavailable: CloudWatch holds no /aws/sagemaker/TrainingJobs "
            "datapoints for this job"
        )
        return f"<p>{html.escape(line)}</p>", [line]
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
        line = "no Debugger output: the job has no DebugHookConfig and no --debug-path was given"
        return f"<p>{html.escape(line)}</p>", [line]
    why = _missing(aws, path)
    if why:
        line = f"Debugger output at {path} not readable: {why}"
        return f"<p>{html.escape(line)}</p>", [line]
    try:
        analysis = analyse_debug_output(path)
    except Exception as exc:  # smdebug raises its own and botocore's errors; any means unreachable
        line = f"Debugger output at {path} unreadable: {type(exc).__name__}: {exc}"
        return f"<p>{html.escape(line)}</p>", [line]
    if not analysis.losses and not analysis.gradient_norms:
        line = f"Debugger output at {path} holds no losses or gradients yet"
        return f"<p>{html.escape(line)}</p>", [line]
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
    lines = [
        f"debugger: {len(analysis.losses)} loss curves, "
        f"{len(analysis.gradient_norms)} layers with gradients"
    ] + [f"flagged: {n}" for n in analysis.findings]
    return "".join(parts), lines


_JOB_REPORTS = ("evaluation.html", "evaluation.json", "profile.html", "profile.json")
"""What `train` writes to /opt/ml/output/data, which SageMaker tars into output.tar.gz."""


def _job_reports_section(
    aws: Aws, description: Mapping[str, Any], folder: Path
) -> tuple[str, list[str]]:
    """Unpack the job's own reports from its output.tar.gz into `folder`; link and sum them up."""
    output = description["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    uri = f"{output}/{description['TrainingJobName']}/output/output.tar.gz"
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    archive = folder / "output.tar.gz"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        aws.boto.client("s3").download_file(bucket, key, str(archive))
    except ClientError:
        line = f"the job's own reports: no {uri} (yet)"
        return f"<p>{html.escape(line)}</p>", [line]
    with tarfile.open(archive) as tar:  # the known names only, written by us: nothing escapes
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            source = tar.extractfile(member) if name in _JOB_REPORTS else None
            if source is not None:
                (folder / name).write_bytes(source.read())
    archive.unlink()
    found = [name for name in _JOB_REPORTS if (folder / name).is_file()]
    links = " ".join(f'<a href="{html.escape(f"{folder.name}/{n}")}">{n}</a>' for n in found)
    parts, lines = [f"<p>{links or 'none in output.tar.gz'}</p>"], [f"job reports -> {folder}/"]
    if "evaluation.json" in found:
        evaluation = json.loads((folder / "evaluation.json").read_text())
        rows = [
            (split, v["images"], f"{v['accuracy']:.4f}", f"{v['top5']:.4f}", f"{v['loss']:.4f}")
            for split, v in evaluation["splits"].items()
        ]
        parts.append(_table(("split", "images", "accuracy", "top-5", "loss"), rows))
        lines += [f"{split}: accuracy {acc}" for split, _, acc, _, _ in rows]
    return "".join(parts), lines


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
    rules_html, rule_lines = _rules_section(description)
    metrics_html, metric_lines = _metrics_section(aws, args.job)
    debug_html, debug_lines = _debug_section(
        aws, args.debug_path or _default_debug_path(description)
    )
    reports_html, report_lines = _job_reports_section(
        aws, description, args.out.with_name(f"{args.out.stem}-{args.job}")
    )
    final = [(m["MetricName"], m["Value"]) for m in description.get("FinalMetricDataList", [])]
    link = console_url(aws.region, "jobs", args.job)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(args.job)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px}}</style>
</head><body><h1>Training job {html.escape(args.job)}</h1>
<p>status {html.escape(status)} {html.escape(description.get("FailureReason", ""))}
- <a href="{html.escape(link)}">console</a></p>
<h2>Final metrics</h2>{_table(("metric", "value"), final)}
<h2>The job's own reports</h2>{reports_html}
<h2>Debugger rules</h2>{rules_html}
<h2>Metrics over time</h2>{metrics_html}
<h2>Tensors (smdebug)</h2>{debug_html}
</body></html>
"""
    args.out.write_text(page)
    print(f"training job {args.job}: {status}")
    for line in report_lines + rule_lines + metric_lines + debug_lines:
        print(line)
    print(f"report -> {args.out}")
    return 0
