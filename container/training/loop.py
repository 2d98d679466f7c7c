"""One training epoch, one evaluation pass, and a set's outputs (logits and pooled features).

The functions take batches from any iterable and a `prepare` function that turns a batch into the
model's input on its device: uint8 images are normalised there (`images.normalize`), cached
features only moved. So the same loop trains the whole network or just its head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from container.abstention import Outputs
from container.training.distributed import Rank, all_reduce_sum, gather_shards
from container.training.hardware import Hardware
from container.training.profiler import Profiler
from container.training.step_checks import StepChecks

__all__ = [
    "EpochStats",
    "EvalResult",
    "evaluate",
    "outputs",
    "train_one_epoch",
]

Batch = tuple[torch.Tensor, torch.Tensor]
Prepare = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EpochStats:
    """Sums over the steps this process ran in an epoch (reduced over processes by the caller)."""

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    steps: int = 0
    stopped: bool = False

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.images)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.images)


@dataclass(frozen=True)
class EvalResult:
    """Metrics over a whole evaluation set, identical on every process."""

    loss: float
    accuracy: float
    top5: float
    images: int
    confusion: torch.Tensor  # [true, predicted] counts
    # With keep_outputs: every image's logits and pooled features, and its label, in the set's
    # order (float32, CPU).
    outputs: Outputs | None = None
    labels: torch.Tensor | None = None

    def kept(self) -> tuple[Outputs, torch.Tensor]:
        """The kept outputs and labels; ValueError when evaluated without `keep_outputs`."""
        if self.outputs is None or self.labels is None:
            raise ValueError("the set was evaluated without keep_outputs")
        return self.outputs, self.labels

    def per_class_accuracy(self) -> list[float | None]:
        support = self.confusion.sum(dim=1)
        correct = self.confusion.diagonal()
        return [
            (int(c) / int(s)) if int(s) else None for c, s in zip(correct, support, strict=True)
        ]


def _timed(batches: Iterable[Batch], profiler: Profiler) -> Iterator[Batch]:
    iterator = iter(batches)
    while True:
        with profiler.phase("data"):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def _autocast(hw: Hardware) -> torch.autocast:
    return torch.autocast(hw.device.type, dtype=hw.amp_dtype, enabled=hw.amp_dtype is not None)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    prepare: Prepare,
    *,
    criterion: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
    hw: Hardware,
    profiler: Profiler,
    checks: StepChecks,
) -> EpochStats:
    """Train over `batches`; `checks` gets each step's loss, left on the device (reading it would
    wait for the GPU), and stops the epoch early when it says so."""
    stats = EpochStats()
    loss_sum = torch.zeros((), device=hw.device, dtype=torch.float64)
    correct = torch.zeros((), device=hw.device, dtype=torch.int64)
    profiler.start_steps()
    for images, labels in _timed(batches, profiler):
        with profiler.phase("forward_backward"):
            inputs = prepare(images)
            targets = labels.to(hw.device, non_blocking=True)
            with _autocast(hw):
                logits = model(inputs)
                loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        with profiler.phase("optimizer"):
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        loss_sum += loss.detach().double() * targets.numel()
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        stats.images += targets.numel()
        stats.steps += 1
        profiler.end_step()
        if checks.after_step(loss):
            stats.stopped = True
            break
    else:
        stats.stopped = checks.finish()
    stats.loss_sum = float(loss_sum)
    stats.correct = int(correct)
    return stats


@contextmanager
def _head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The pooled features each forward pass feeds the classification head (`fc`, or the model
    itself when it is the head), collected while the block runs."""
    head = getattr(model, "fc", model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].float().cpu()))
    try:
        yield seen
    finally:
        handle.remove()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    prepare: Prepare,
    *,
    criterion: nn.Module,
    num_classes: int,
    hw: Hardware,
    rank: Rank,
    keep_outputs: bool = False,
) -> EvalResult:
    """Loss, top-1, top-5 and the confusion matrix over every process's share of a set; with
    `keep_outputs`, the logits, features and labels of the whole set too."""
    model.eval()
    k = min(5, num_classes)
    loss_sum = torch.zeros((), device=hw.device, dtype=torch.float64)
    top5 = torch.zeros((), device=hw.device, dtype=torch.int64)
    confusion = torch.zeros(num_classes * num_classes, device=hw.device, dtype=torch.int64)
    kept_logits, kept_labels = [], []
    capture: AbstractContextManager[list[torch.Tensor]] = (
        _head_inputs(model) if keep_outputs else nullcontext([])
    )
    with capture as features:
        for images, labels in batches:
            targets = labels.to(hw.device, non_blocking=True)
            with _autocast(hw):
                logits = model(prepare(images))
                loss = criterion(logits, targets)
            loss_sum += loss.double() * targets.numel()
            best = logits.topk(k, dim=1).indices
            top5 += (best == targets[:, None]).any(dim=1).sum()
            confusion += torch.bincount(
                targets * num_classes + best[:, 0], minlength=num_classes * num_classes
            )
            if keep_outputs:
                kept_logits.append(logits.float().cpu())
                kept_labels.append(labels)
    totals = torch.stack([loss_sum, top5.double()])
    all_reduce_sum(totals, rank)
    all_reduce_sum(confusion, rank)
    matrix = confusion.view(num_classes, num_classes).cpu()
    count = int(matrix.sum())
    result = EvalResult(
        loss=float(totals[0]) / max(1, count),
        accuracy=int(matrix.diagonal().sum()) / max(1, count),
        top5=float(totals[1]) / max(1, count),
        images=count,
        confusion=matrix,
    )
    if not keep_outputs:
        return result
    logits_, features_, labels_ = gather_shards(
        (_cat(kept_logits, num_classes), _cat(features, 0), _cat(kept_labels, None)), rank
    )
    return replace(result, outputs=Outputs(logits_, features_), labels=labels_)


def _cat(tensors: list[torch.Tensor], width: int | None) -> torch.Tensor:
    """The rows of `tensors`, or no rows (of `width` columns; None: labels) when there are none."""
    if tensors:
        return torch.cat(tensors)
    return torch.empty(0, dtype=torch.long) if width is None else torch.empty(0, width)


@torch.inference_mode()
def outputs(
    model: nn.Module, batches: Iterable[Batch], prepare: Prepare, hw: Hardware
) -> tuple[Outputs, torch.Tensor]:
    """The logits, pooled features and labels of every batch (this process's, float32, CPU)."""
    model.eval()
    kept_logits, kept_labels = [], []
    with _head_inputs(model) as features:
        for images, labels in batches:
            with _autocast(hw):
                kept_logits.append(model(prepare(images)).float().cpu())
            kept_labels.append(labels)
    return Outputs(torch.cat(kept_logits), torch.cat(features)), torch.cat(kept_labels)
