"""The training job. Importing the package is cheap: `launch` reads the metric regexes from here."""

from __future__ import annotations

from container.training.metrics import METRIC_DEFINITIONS, OBJECTIVE_METRIC

__all__ = ["METRIC_DEFINITIONS", "OBJECTIVE_METRIC"]
