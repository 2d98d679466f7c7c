"""The metric lines SageMaker scrapes from the log, and the regexes that scrape them.

One line per epoch, from rank 0 only, `key=value` pairs ending in `;` (docs/sagemaker-contract.md
§2.5); the objective `val_acc` is the last pair of each line, and the job's last line carries the
objective of the model it ships. `launch` passes `METRIC_DEFINITIONS` to both the estimator and the
tuner, so printing and scraping cannot drift apart. This module imports nothing heavy for that
reason.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = ["METRIC_DEFINITIONS", "METRIC_NAMES", "OBJECTIVE_METRIC", "format_line", "print_line"]

OBJECTIVE_METRIC = "val_acc"
"""What tuning maximises: validation top-1 accuracy of the model the job ships."""

METRIC_NAMES = (
    "epoch",
    "best_epoch",
    "train_loss",
    "train_acc",
    "lr",
    "images_per_sec",
    "val_loss",
    "val_top5",
    "test_loss",
    "test_acc",
    "test_top5",
    OBJECTIVE_METRIC,
)

# `\b` anchors each key, so `epoch=` does not match inside `best_epoch=`.
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": name, "Regex": rf"\b{name}=([0-9.eE+-]+)"} for name in METRIC_NAMES
]


def format_line(values: Mapping[str, float | int], prefix: str = "") -> str:
    """`epoch=3 train_loss=0.812340 val_acc=0.734210;` with plain decimals and `val_acc` last."""
    unknown = set(values) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"no metric definition for {sorted(unknown)}")
    ordered = sorted(values.items(), key=lambda kv: kv[0] == OBJECTIVE_METRIC)
    pairs = " ".join(
        f"{key}={value:d}" if isinstance(value, int) else f"{key}={value:.6f}"
        for key, value in ordered
    )
    return f"{prefix} {pairs};" if prefix else f"{pairs};"


def print_line(
    values: Mapping[str, float | int], prefix: str = "", stream: TextIO | None = None
) -> None:
    """Print one metric line and flush it, so CloudWatch (and the tuner) sees it at once."""
    print(format_line(values, prefix), file=stream or sys.stdout, flush=True)
