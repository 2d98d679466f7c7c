"""The job's reports in /opt/ml/output/data: evaluation and profile, each as JSON and HTML.

The JSON is the record (other tools read it); the HTML renders that same JSON for people, with
plots. SageMaker tars the folder into output.tar.gz next to model.tar.gz.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from container import html_page
from container.atomic import write_text_atomically
from container.sagemaker_env import EVALUATION_HTML, EVALUATION_JSON, PROFILE_HTML, PROFILE_JSON
from container.training.data import DatasetSplits
from container.training.findings import findings_html
from container.training.loop import EvalResult
from container.training.profiler import PHASES
from container.training.quality import (
    NONE_OF_THESE,
    abstention_section,
    calibration_section,
    class_metrics,
    classes_section,
    confused_pairs,
    confused_section,
    findings,
    findings_section,
)
from container.training.rules_report import rules_section
from container.training.trust import Trust

__all__ = ["evaluation_report", "write_evaluation", "write_profile"]

_WORST = 15
_MAX_MATRIX_CLASSES = 40  # beyond that the cells are unreadable: the top confused pairs instead


def _split_json(
    result: EvalResult, classes: Sequence[str], samples: Sequence[tuple[str, int]]
) -> dict[str, Any]:
    names = list(classes) + [NONE_OF_THESE] * (len(result.confusion) - len(classes))
    split = {
        "images": result.images,
        "loss": result.loss,
        "accuracy": result.accuracy,
        "top5": result.top5,
        **class_metrics(result.confusion[: len(classes)], classes),
        "confusion_matrix": result.confusion.tolist(),
        "confusion_labels": names,
    }
    if result.outputs is not None:
        kept, labels = result.kept()
        split["confused_pairs"] = confused_pairs(kept.logits, labels, samples, names)
    return split


def evaluation_report(
    *,
    model_version: str,
    splits: DatasetSplits,
    results: Mapping[str, EvalResult],
    history: Sequence[Mapping[str, float | int]],
    best_epoch: int | None,
    trust: Trust | None = None,
    int8: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation record: final metrics per split and per class, where the model is weak,
    calibration and abstention, the int8 gate, the training curves, and findings in words."""
    classes = splits.classes
    samples = {s.channel: s.samples for s in splits.sets}
    report: dict[str, Any] = {
        "model_version": model_version,
        "classes": classes,
        "best_epoch": best_epoch,
        "epochs_completed": len(history),
        "splits": {
            name: _split_json(result, classes, samples[name]) for name, result in results.items()
        },
        "history": list(history),
        "data": {
            image_set.channel: {
                "images": len(image_set.samples),
                "skipped": [{"path": b.path, "reason": b.reason} for b in image_set.bad],
            }
            for image_set in splits.channels
        },
    }
    if trust is not None:
        report |= {"calibration": trust.calibration, "abstention": trust.abstention}
    if int8 is not None:
        report["int8"] = dict(int8)
    return {"findings": findings(report), **report}


# --- evaluation --------------------------------------------------------------------------------


def _curves(history: Sequence[Mapping[str, Any]]) -> str:
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 3.5))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "valid")):
        loss_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "valid"), ("val_top5", "valid top-5")):
        acc_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    loss_ax.set(title="Loss", xlabel="epoch")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.legend()
    acc_ax.legend()
    return html_page.figure(fig, "loss and accuracy per epoch")


def _worst(split: Mapping[str, Any]) -> str:
    rated = [c for c in split["per_class"] if c["recall"] is not None]
    worst = sorted(rated, key=lambda c: (c["recall"], -c["support"]))[:_WORST]
    fig = Figure(figsize=(8, 0.3 * len(worst) + 1))
    ax = fig.subplots()
    ax.barh([c["class"] for c in reversed(worst)], [c["recall"] for c in reversed(worst)])
    ax.set(xlim=(0, 1), xlabel="recall", title=f"{len(worst)} worst classes")
    return html_page.figure(fig, "worst classes")


def _matrix(split: Mapping[str, Any], name: str) -> str:
    matrix, labels = split["confusion_matrix"], split["confusion_labels"]
    if len(matrix) > _MAX_MATRIX_CLASSES:
        return html_page.note(
            f"{len(matrix)} classes are too many to draw readably: the most confused pairs are "
            "above, the whole matrix is in evaluation.json."
        )
    side = 4 + 0.25 * len(labels)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set(title=f"Confusion matrix ({name})", xlabel="predicted", ylabel="true")
    fig.colorbar(image)
    return html_page.figure(fig, f"confusion matrix for {name}")


def _evaluation_html(report: Mapping[str, Any]) -> str:
    splits = report["splits"]
    summary = html_page.table(
        ["split", "images", "accuracy", "top-5", "loss", "macro F1"],
        [
            [n, s["images"], s["accuracy"], s["top5"], s["loss"], s["averages"]["f1"]["macro"]]
            for n, s in splits.items()
        ],
    )
    sections = [
        findings_section(report["findings"]),
        html_page.section(
            "Summary",
            html_page.note(
                f"model {report['model_version']}, best epoch {report['best_epoch']} of "
                f"{report['epochs_completed']}"
            ),
            summary,
        ),
    ]
    if "calibration" in report:
        sections.append(calibration_section(report["calibration"]))
    if "abstention" in report:
        sections.append(abstention_section(report["abstention"]))
    if report["history"]:
        sections.append(html_page.section("Training curves", _curves(report["history"])))
    sections.append(rules_section(report))
    focus = "test" if "test" in splits else "valid"
    if focus in splits:
        split = splits[focus]
        sections += [
            classes_section(split, focus),
            html_page.section(f"Worst classes ({focus})", _worst(split)),
            confused_section(split, focus),
            _matrix(split, focus),
        ]
    skipped = [
        [channel, s["path"], s["reason"]]
        for channel, data in report["data"].items()
        for s in data["skipped"]
    ]
    sections.append(
        html_page.section(
            "Data",
            html_page.table(
                ["channel", "images used", "skipped"],
                [[c, d["images"], len(d["skipped"])] for c, d in report["data"].items()],
            ),
            html_page.table(["channel", "skipped file", "reason"], skipped) if skipped else "",
        )
    )
    return html_page.page("Evaluation report", *sections)


def write_evaluation(directory: Path, report: Mapping[str, Any]) -> None:
    write_text_atomically(directory / EVALUATION_JSON, json.dumps(report, indent=1))
    write_text_atomically(directory / EVALUATION_HTML, _evaluation_html(report))


# --- profile -----------------------------------------------------------------------------------


def _phase_plot(epochs: Sequence[Mapping[str, Any]]) -> str:
    fig = Figure(figsize=(10, 3.5))
    time_ax, rate_ax = fig.subplots(1, 2)
    labels = [e["epoch"] for e in epochs]
    bottom = [0.0] * len(epochs)
    for phase in PHASES:
        values = [e["seconds"][phase] for e in epochs]
        time_ax.bar(labels, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    time_ax.set(title="Time per epoch", xlabel="epoch", ylabel="seconds")
    time_ax.legend(fontsize="small")
    rate_ax.plot(labels, [e["images_per_sec"] for e in epochs], marker="o")
    rate_ax.set(title="Training throughput", xlabel="epoch", ylabel="images/s", ylim=(0, None))
    for ax in (time_ax, rate_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return html_page.figure(fig, "time split and throughput per epoch")


def _usage_plot(samples: Sequence[Mapping[str, Any]]) -> str:
    t = [s["t"] for s in samples]
    fig = Figure(figsize=(10, 3.5))
    util_ax, mem_ax = fig.subplots(1, 2)
    util_ax.plot(t, [s["cpu_percent"] for s in samples], label="CPU %")
    mem_ax.plot(t, [s["rss_mb"] for s in samples], label="job RSS MB")
    if any(s["gpu_percent"] is not None for s in samples):
        util_ax.plot(t, [s["gpu_percent"] or 0 for s in samples], label="GPU %")
        mem_ax.plot(t, [s["gpu_memory_mb"] or 0 for s in samples], label="GPU memory MB")
    util_ax.set(title="Utilisation", xlabel="seconds", ylim=(0, 105))
    mem_ax.set(title="Memory", xlabel="seconds", ylabel="MB")
    util_ax.legend()
    mem_ax.legend()
    return html_page.figure(fig, "CPU, GPU and memory over time")


def _profile_html(profile: Mapping[str, Any]) -> str:
    epochs = profile["epochs"]
    setup = html_page.table(["setting", "value"], sorted(profile["setup"].items()))
    rows = [
        [e["epoch"], e["train_images"], e["images_per_sec"], e["wall_s"]]
        + [e["seconds"][p] for p in PHASES]
        for e in epochs
    ]
    sections = [
        findings_html(profile.get("findings", [])),
        html_page.section("Setup", setup),
        html_page.section(
            "Epochs",
            _phase_plot(epochs) if epochs else "",
            html_page.table(["epoch", "images", "images/s", "wall s", *PHASES], rows),
        ),
    ]
    after = profile.get("after_epochs_s")
    if after:
        section = html_page.table(["step", "seconds"], list(after.items()))
        sections.append(html_page.section("After the epochs (rank 0)", section))
    samples = profile["samples"]
    if samples:
        cpu = [s["cpu_percent"] for s in samples]
        gpu = [s["gpu_percent"] for s in samples if s["gpu_percent"] is not None]
        stats = [
            ["mean CPU %", sum(cpu) / len(cpu)],
            ["peak job RSS MB", max(s["rss_mb"] for s in samples)],
        ]
        if gpu:
            stats.append(["mean GPU %", sum(gpu) / len(gpu)])
        sections.append(
            html_page.section("Machine", _usage_plot(samples), html_page.table(["", ""], stats))
        )
    return html_page.page("Training profile", *sections)


def write_profile(directory: Path, profile: Mapping[str, Any]) -> None:
    write_text_atomically(directory / PROFILE_JSON, json.dumps(profile, indent=1))
    write_text_atomically(directory / PROFILE_HTML, _profile_html(profile))
