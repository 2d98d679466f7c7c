"""Optimiser and learning-rate schedule, the way fine-tuning recipes set them up."""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
    StepLR,
)

from container.training.hyperparameters import Hyperparameters

__all__ = ["build_optimizer", "build_scheduler"]

_WARMUP_START = 0.01  # warm-up starts at lr/100


def build_optimizer(model: nn.Module, hp: Hyperparameters) -> Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and BatchNorm parameters.

    Frozen parameters are included: their gradients stay None, which every torch optimiser skips,
    so unfreezing later needs no new optimiser.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": hp.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if hp.optimizer == "adamw":
        return AdamW(groups, lr=hp.lr)
    return SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)


def build_scheduler(optimizer: Optimizer, hp: Hyperparameters, steps_per_epoch: int) -> LRScheduler:
    """A per-step schedule: linear warm-up, then cosine, step or constant."""
    total = hp.epochs * steps_per_epoch
    warmup = min(round(hp.warmup_epochs * steps_per_epoch), total - 1)
    main: LRScheduler
    if hp.lr_schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    elif hp.lr_schedule == "step":
        main = StepLR(optimizer, step_size=hp.lr_step_epochs * steps_per_epoch, gamma=hp.lr_gamma)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup <= 0:
        return main
    ramp = LinearLR(optimizer, start_factor=_WARMUP_START, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
