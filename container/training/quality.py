"""Where the model is weak, in evaluation.json and its HTML: per-class precision, recall and F1,
the most confused pairs with example images, calibration, abstention, and findings in words.

The JSON parts are computed from the confusion matrix and the kept logits; the HTML parts read
only the JSON (and the example images' files, for thumbnails).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from PIL import Image

from container import html_page
from container.abstention import SCORE_WORDS

__all__ = [
    "NONE_OF_THESE",
    "abstention_section",
    "calibration_section",
    "class_metrics",
    "classes_section",
    "confused_pairs",
    "confused_section",
    "findings",
    "findings_section",
]

NONE_OF_THESE = "(none of these)"
_PAIRS = 10
_EXAMPLES = 3
_THUMBNAIL = 96


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def class_metrics(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Per class: support, correct, precision (None when never predicted), recall (None without
    support) and F1; their macro and support-weighted averages (an undefined value counts 0)."""
    matrix = confusion.double()
    support, predicted, correct = matrix.sum(dim=1), matrix.sum(dim=0), matrix.diagonal()
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(classes):
        precision = _ratio(float(correct[i]), float(predicted[i]))
        recall = _ratio(float(correct[i]), float(support[i]))
        f1 = (
            None
            if precision is None or recall is None
            else (2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        )
        rows.append(
            {
                "index": i,
                "class": name,
                "support": int(support[i]),
                "correct": int(correct[i]),
                "precision": precision,
                "recall": recall,
                "f1": f1,
            }
        )
    total = sum(r["support"] for r in rows)
    averages = {}
    for name in ("precision", "recall", "f1"):
        values = [(r[name] or 0.0, r["support"]) for r in rows]
        averages[name] = {
            "macro": sum(v for v, _ in values) / len(values),
            "weighted": _ratio(sum(v * s for v, s in values), total),
        }
    return {"per_class": rows, "averages": averages}


def confused_pairs(
    logits: torch.Tensor, labels: torch.Tensor, samples: Sequence[tuple[str, int]], names: list[str]
) -> list[dict[str, Any]]:
    """The most frequent (true, predicted) mistakes, each with a few of its images' paths."""
    predicted = logits.argmax(dim=1)
    wrong = (predicted != labels).nonzero().flatten().tolist()
    pairs: dict[tuple[int, int], list[int]] = {}
    for i in wrong:
        pairs.setdefault((int(labels[i]), int(predicted[i])), []).append(i)
    ranked = sorted(pairs.items(), key=lambda item: (-len(item[1]), item[0]))[:_PAIRS]
    return [
        {
            "true": names[t],
            "predicted": names[p],
            "count": len(images),
            "examples": [samples[i][0] for i in images[:_EXAMPLES]],
        }
        for (t, p), images in ranked
    ]


# --- findings ------------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def findings(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """What is good, what is weak and what to try, in words, from the evaluation record."""
    splits = report["splits"]
    focus = "test" if "test" in splits else "valid"
    split = splits[focus]
    said: list[dict[str, str]] = []

    def say(kind: str, text: str) -> None:
        said.append({"kind": kind, "text": text})

    say(
        "good" if split["accuracy"] >= 0.9 else "weak",
        f"Accuracy on {focus}: {_pct(split['accuracy'])} (top-5 {_pct(split['top5'])}) on "
        f"{split['images']} images; macro F1 {split['averages']['f1']['macro']:.3f}.",
    )
    rated = [c for c in split["per_class"] if c["recall"] is not None]
    weak = sorted(rated, key=lambda c: (c["recall"], -c["support"]))[:3]
    if weak and weak[0]["recall"] < split["accuracy"]:
        listed = ", ".join(f"{c['class']} (recall {c['recall']:.2f})" for c in weak)
        say("try", f"Weakest classes on {focus}: {listed}: more or cleaner images of them.")
    pairs = split.get("confused_pairs", [])
    if pairs:
        top = pairs[0]
        say(
            "weak",
            f"Most confused: {top['true']} taken for {top['predicted']} ({top['count']} "
            f"image{'s' if top['count'] > 1 else ''}); see the examples below.",
        )
    calibration = report.get("calibration")
    if calibration:
        c = calibration["splits"][focus]
        better = c["ece_after"] <= c["ece_before"]
        say(
            "good" if better else "weak",
            f"Calibration: temperature {calibration['temperature']:.3f} (fitted on valid); on "
            f"{focus} ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f}, NLL "
            f"{c['nll_before']:.3f} -> {c['nll_after']:.3f}"
            + ("." if better else ": no better on this split (a small valid set fits T loosely)."),
        )
    abstention = report.get("abstention")
    if abstention:
        point = abstention["operating_point"]
        answered = point["accuracy_answered"]
        say(
            "good",
            f"Abstention: {SCORE_WORDS[abstention['score']]} below "
            f"{abstention['threshold']:.4g} ({abstention['rule']}). On {point['split']} it "
            f"answers {_pct(point['coverage'])} of the images"
            + (f", {_pct(answered)} of them correctly" if answered is not None else "")
            + f" (all images: {_pct(point['accuracy_all'])}).",
        )
        if point["unknown_caught"] is not None:
            auroc = abstention["comparison"][abstention["score"]]["auroc_unknown"]
            say(
                "good" if point["unknown_caught"] >= 0.8 else "weak",
                f"It declines {_pct(point['unknown_caught'])} of the {point['unknown_images']} "
                f"held-out unknown images (AUROC {auroc:.3f}).",
            )
        else:
            say(
                "try",
                "No `unknown` channel: unknown images were measured on synthetic negatives only "
                f"({', '.join(point['synthetic_caught'])}), which are easier than real ones. Give "
                "an `unknown` channel of other animals, people and objects to set and check the "
                "threshold on them.",
            )
    int8 = report.get("int8")
    if int8:
        say(
            "good" if int8["passed"] else "weak",
            f"int8: {'ships' if int8['passed'] else 'not shipped (the server runs fp32 or bf16)'}"
            f": {int8['reason']}.",
        )
    return said


def findings_section(said: Sequence[Mapping[str, str]]) -> str:
    words = {"good": "good", "weak": "weak", "try": "to try"}
    return html_page.section(
        "Findings", html_page.table(["", "finding"], [[words[f["kind"]], f["text"]] for f in said])
    )


# --- sections ----------------------------------------------------------------------------------


def classes_section(split: Mapping[str, Any], name: str) -> str:
    averages = split["averages"]
    return html_page.section(
        f"Per class ({name})",
        html_page.note("Click a column's header to sort by it."),
        html_page.table(
            ["class", "support", "correct", "precision", "recall", "F1"],
            [
                [c["class"], c["support"], c["correct"], c["precision"], c["recall"], c["f1"]]
                for c in split["per_class"]
            ],
            sortable=True,
        ),
        html_page.table(
            ["average", "precision", "recall", "F1"],
            [
                [kind, *(averages[m][kind] for m in ("precision", "recall", "f1"))]
                for kind in ("macro", "weighted")
            ],
        ),
    )


def _thumbnail(path: str) -> str:
    try:
        with Image.open(path) as image:
            image.thumbnail((_THUMBNAIL, _THUMBNAIL))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
    except OSError:
        return ""
    return html_page.png(buffer.getvalue(), Path(path).name)


def confused_section(split: Mapping[str, Any], name: str) -> str:
    pairs = split.get("confused_pairs", [])
    if not pairs:
        return html_page.section(f"Most confused ({name})", html_page.note("No mistakes."))
    rows = [
        [
            p["true"],
            p["predicted"],
            p["count"],
            html_page.Html("".join(map(_thumbnail, p["examples"]))),
        ]
        for p in pairs
    ]
    return html_page.section(
        f"Most confused ({name})",
        html_page.table(["true class", "predicted as", "images", "examples"], rows),
    )


def _reliability_plot(c: Mapping[str, Any], name: str) -> str:
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    for key, label in (("reliability_before", "before"), ("reliability_after", "after")):
        rows = [r for r in c[key] if r["count"]]
        ax.plot(
            [r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=label
        )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence", ylabel="accuracy")
    ax.set(title=f"Reliability ({name})")
    ax.legend()
    return html_page.figure(fig, f"reliability diagram for {name}")


def calibration_section(calibration: Mapping[str, Any]) -> str:
    splits = calibration["splits"]
    return html_page.section(
        "Calibration",
        html_page.note(
            f"Temperature {calibration['temperature']:.4f}, fitted on valid by minimising NLL; "
            "the served probabilities are softmax(logits / T). ECE over 15 bins."
        ),
        html_page.table(
            ["split", "ECE before", "ECE after", "NLL before", "NLL after"],
            [
                [n, c["ece_before"], c["ece_after"], c["nll_before"], c["nll_after"]]
                for n, c in splits.items()
            ],
        ),
        *(_reliability_plot(c, n) for n, c in splits.items()),
    )


def _risk_coverage_plot(abstention: Mapping[str, Any]) -> str:
    curve = abstention["risk_coverage"]
    point = abstention["operating_point"]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["coverage"] for r in curve], [r["accuracy"] for r in curve], marker=".")
    ax.axvline(point["coverage"], linestyle="--", color="red", label="chosen threshold")
    ax.set(xlim=(0, 1.02), xlabel="coverage (fraction answered)", ylabel="accuracy of answers")
    ax.set(title=f"Risk-coverage ({point['split']}, {abstention['score']})")
    ax.legend()
    return html_page.figure(fig, "risk-coverage curve")


def abstention_section(abstention: Mapping[str, Any]) -> str:
    point = abstention["operating_point"]
    comparison = abstention["comparison"]
    notes = [
        f"Chosen: {SCORE_WORDS[abstention['score']]}, the best {abstention['chosen_by']}; "
        f"threshold {abstention['threshold']:.4g}: {abstention['rule']}."
    ]
    if abstention["negatives"] == "synthetic":
        notes.append(abstention["synthetic_note"] + ".")
    rows = [
        ["coverage", point["coverage"]],
        ["accuracy of the answers", point["accuracy_answered"]],
        ["accuracy of all", point["accuracy_all"]],
        *[[f"{kind} declined", share] for kind, share in point["synthetic_caught"].items()],
    ]
    if point["unknown_caught"] is not None:
        rows.append(
            [f"unknown images declined (of {point['unknown_images']})", point["unknown_caught"]]
        )
    return html_page.section(
        "Abstention",
        *(html_page.note(n) for n in notes),
        html_page.table(
            ["score", "AUROC unknown channel", "AUROC synthetic", "AUROC right vs wrong"],
            [
                [s, c["auroc_unknown"], c["auroc_synthetic"], c["auroc_errors"]]
                for s, c in comparison.items()
            ],
        ),
        html_page.table([f"at the threshold ({point['split']})", ""], rows),
        _risk_coverage_plot(abstention),
    )
