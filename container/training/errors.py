"""Errors a training job reports in /opt/ml/output/failure.

`TrainingError` and its subclasses are problems the user can fix (bad config, bad data, no disk):
their message's first line says what to fix. Anything else that escapes is an internal error.
"""

from __future__ import annotations

import traceback

__all__ = [
    "ConfigError",
    "DataError",
    "DivergenceError",
    "ResourceError",
    "TrainingError",
    "WeightsError",
    "failure_text",
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


def failure_text(exc: BaseException) -> str:
    """What /opt/ml/output/failure says about `exc`: `Name: message` for a user-fixable error;
    for anything else, that it is a bug in the image, with the traceback's tail."""
    if isinstance(exc, TrainingError):
        return f"{type(exc).__name__}: {exc}"
    tail = "".join(traceback.format_exception(exc)[-3:])
    return (
        f"InternalError: {type(exc).__name__}: {exc}\n"
        "This is a bug in the training image, not in your data or settings; the job log has the "
        f"traceback.\n{tail}"
    )
