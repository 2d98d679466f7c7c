"""The Debugger rules' section of evaluation.html: each verdict, and the evidence it was drawn from.

It renders evaluation.json's `rules` and `rule_evidence` (written by `rules.RuleRecorder.report`),
so the page shows what the JSON says: the training loss per step with the step where a loss rule
fired, train and validation loss per epoch, each layer's gradient norm over the steps, and the
ReLU input variances of the first forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from container import html_page

__all__ = ["rules_section"]

_STATUS = {"ok": "ok", "issues_found": "ISSUES FOUND", "not_evaluated": "not evaluated"}


def _fired(rules: Sequence[Mapping[str, Any]], *names: str) -> list[tuple[str, int]]:
    return [
        (r["name"], r["step"])
        for r in rules
        if r["name"] in names and r["status"] == "issues_found" and r["step"] is not None
    ]


def _mark(ax: Axes, fired: Sequence[tuple[str, int]]) -> None:
    for name, step in fired:
        ax.axvline(step, color="red", linestyle="--", linewidth=1)
        ax.annotate(
            f"{name} (step {step})",
            (step, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize="small",
            color="red",
        )


def _loss_plot(evidence: Mapping[str, Any], rules: Sequence[Mapping[str, Any]]) -> str:
    losses, epochs = evidence["losses"], evidence["epochs"]
    fig = Figure(figsize=(10, 3.5))
    step_ax, epoch_ax = fig.subplots(1, 2)
    steps, values = losses["steps"], losses["values"]
    step_ax.plot(steps, values, linewidth=0.8, label="training loss per step")
    if losses.get("compared"):
        compared_steps, compared = zip(*losses["compared"], strict=True)
        step_ax.plot(
            compared_steps, compared, marker="o", linewidth=2, label="compared (10-step means)"
        )
    step_ax.set(title="Training loss", xlabel="global step")
    step_ax.legend(fontsize="small")
    _mark(step_ax, _fired(rules, "loss_not_decreasing", "poor_weight_initialization"))
    ends = [e["step"] for e in epochs]
    epoch_ax.plot(ends, [e["train_loss"] for e in epochs], marker="o", label="train (epoch mean)")
    epoch_ax.plot(ends, [e["val_loss"] for e in epochs], marker="o", label="valid")
    epoch_ax.set(title="Loss per epoch", xlabel="global step at the epoch's end")
    epoch_ax.legend(fontsize="small")
    _mark(epoch_ax, _fired(rules, "overfit", "overtraining"))
    return html_page.figure(fig, "training loss per step and per epoch, with the steps rules fired")


def _gradient_plot(evidence: Mapping[str, Any], rules: Sequence[Mapping[str, Any]]) -> str:
    norms = evidence["gradient_norms"]
    layers: Mapping[str, Sequence[float | None]] = norms["layers"]
    fig = Figure(figsize=(10, 4))
    ax = fig.subplots()
    colours = colormaps["viridis"]
    for i, values in enumerate(layers.values()):
        # null: no gradient at that step (frozen) or a non-finite one (exploding_tensor says so)
        points = [(s, v) for s, v in zip(norms["steps"], values, strict=True) if v]
        if points:
            steps, finite = zip(*points, strict=True)
            ax.plot(steps, finite, linewidth=0.8, color=colours(i / max(1, len(layers) - 1)))
    ax.set_yscale("log")
    ax.set(
        title=f"Gradient L2 norm per layer ({len(layers)} tensors; dark = input, light = output)",
        xlabel="global step",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _mark(ax, _fired(rules, "vanishing_gradient", "exploding_tensor"))
    return html_page.figure(fig, "gradient norm of each layer over the steps")


def _start_plot(evidence: Mapping[str, Any]) -> str:
    variance: Mapping[str, float | None] = evidence["relu_input_variance"]
    weight_std: Mapping[str, float | None] = evidence.get("weight_std") or {}
    fig = Figure(figsize=(10, 6.5))
    relu_ax, weight_ax = fig.subplots(2, 1)
    shown = {k: v for k, v in variance.items() if v}
    relu_ax.bar(list(shown), list(shown.values()))
    ratio = max(shown.values()) / min(shown.values()) if shown else float("nan")
    relu_ax.set(
        title="Variance of each ReLU's input in the first forward pass: largest / smallest = "
        f"{ratio:.3g} (poor_weight_initialization fires above 10)",
        yscale="log",
    )
    relu_ax.tick_params(axis="x", labelrotation=90, labelsize="x-small")
    stds = {k: v for k, v in weight_std.items() if v}
    weight_ax.plot(list(stds.values()), marker=".")
    weight_ax.set(
        title="Standard deviation of each weight tensor before the first step",
        xlabel="layer (input to output)",
        yscale="log",
    )
    fig.tight_layout()
    return html_page.figure(fig, "ReLU input variance and weight spread per layer at the start")


def rules_section(report: Mapping[str, Any]) -> str:
    """The section for evaluation.html; empty when the report has no rule verdicts."""
    rules: Sequence[Mapping[str, Any]] = report.get("rules") or []
    if not rules:
        return ""
    evidence: Mapping[str, Any] = report.get("rule_evidence") or {}
    parts = [
        html_page.note(
            "What SageMaker Debugger's built-in rules check, evaluated by the training job itself "
            "with the rules' default parameters, from the losses, gradients and first activations "
            "it recorded. The step is the global training step where a rule first fired."
        ),
        html_page.table(
            ["rule", "verdict", "step", "what it means"],
            [[r["name"], _STATUS[r["status"]], r["step"], r["message"]] for r in rules],
        ),
    ]
    if evidence.get("losses", {}).get("steps"):
        parts.append(_loss_plot(evidence, rules))
    if evidence.get("gradient_norms", {}).get("layers"):
        parts.append(_gradient_plot(evidence, rules))
    if evidence.get("relu_input_variance"):
        parts.append(_start_plot(evidence))
    return html_page.section("Debugger rules", *parts)
