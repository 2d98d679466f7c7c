"""Errors a training job reports in /opt/ml/output/failure.

`TrainingError` and its subclasses are problems the user can fix (bad config, bad data, no disk):
their message's first line says what to fix. Anything else that escapes is an internal error.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DivergenceError",
    "ResourceError",
    "TrainingError",
    "WeightsError",
]


class TrainingError(Exception):
    """Base of user-fixable errors; `str(error)` starts with what to fix."""


class ConfigError(TrainingError):
    """Raised for config files or hyperparameters that cannot be used as given."""


class DataError(TrainingError):
    """Raised for missing or empty channels, unusable class layouts and too many bad images."""


class WeightsError(TrainingError):
    """Raised when pretrained weights are asked for but none can be found or loaded."""


class ResourceError(TrainingError):
    """Raised when the machine lacks something the job needs (disk for checkpoints, memory, a GPU
    that CUDA can use on a GPU instance type)."""


class DivergenceError(TrainingError):
    """Raised when the training loss, the validation loss or the weights become NaN or infinite:
    training does not recover from that, so the job stops at once and ships no model."""
