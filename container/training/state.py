"""What a training process holds while it runs: its built parts, its progress, a stop request.

`Parts` never changes once built; `RunState` is the progress the loop advances and every checkpoint
saves; `StopRequest` is set by a signal handler and read between steps (`step_checks`).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet

from container.decoding import Preprocessing
from container.training.data import DatasetSplits
from container.training.distributed import Rank
from container.training.hardware import Hardware
from container.training.profiler import Profiler
from container.training.settings import TrainSettings

__all__ = ["Best", "Parts", "RunState", "StopRequest"]

logger = logging.getLogger(__name__)


class StopRequest:
    """Set by SIGTERM (StopTrainingJob, spot reclaim, MaxRuntime) or SIGINT; read by the loop."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._event.is_set():
            logger.warning(
                "%s received: stopping after the current step (several processes: at their next "
                "check_steps check), then saving a checkpoint and the model",
                signal.Signals(signum).name,
            )
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@dataclass
class Best:
    """The best model so far (by validation accuracy) and the epoch that produced it."""

    epoch: int
    val_acc: float
    state_dict: dict[str, torch.Tensor]


@dataclass
class RunState:
    """Where the run is: mutated by the loop, saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # steps of that epoch already done
    best: Best | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Parts:
    """The job's fixed pieces, built once."""

    settings: TrainSettings
    rank: Rank
    hw: Hardware
    prep: Preprocessing
    splits: DatasetSplits
    model: ResNet
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    profiler: Profiler
    steps_per_epoch: int
    pretrained_from: str
