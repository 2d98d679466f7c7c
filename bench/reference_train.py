"""The baseline: a plain loop written the way torchvision's classification reference is.

It follows references/classification/train.py: `ImageFolder` with per-image PIL transforms
(`RandomResizedCrop`, flip, `ToTensor`, `Normalize`), a `DataLoader` with shuffling, ResNet in
float32 eager mode (no autocast, no channels-last), SGD with momentum. The optimiser and the
learning-rate schedule come from `container.training.optim` with the same `Hyperparameters` the
job gets, so both loops follow the identical LR curve: that is the reference's
`--opt sgd_nesterov --norm-weight-decay 0 --bias-weight-decay 0` with a per-step schedule.

`--linear-probe` freezes everything but the head and feeds the training set through the eval
transforms, the plain way to train a head (every epoch runs the whole frozen backbone again).

Throughput is measured as the job measures it: training images of an epoch divided by the time
spent in that epoch's training loop (loader start-up included, evaluation excluded). The result
is written as JSON for `bench.train_throughput`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from container.decoding import IMAGENET_MEAN, IMAGENET_STD
from container.training.hyperparameters import Hyperparameters
from container.training.optim import build_optimizer, build_scheduler

__all__ = ["EpochResult", "ReferenceSettings", "evaluate", "main", "train_one_epoch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSettings:
    """One reference run: where the data is, where the result goes, and the shared knobs."""

    data: Path  # an ImageFolder root holding train/ and valid/
    output: Path  # the result JSON
    hp: Hyperparameters  # the job's hyperparameters, so both loops share one schedule
    workers: int
    linear_probe: bool


@dataclass(frozen=True)
class EpochResult:
    """One epoch of the reference loop: training throughput and validation metrics."""

    epoch: int
    images: int
    train_s: float
    data_s: float
    wall_s: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float

    @property
    def images_per_sec(self) -> float:
        return self.images / self.train_s if self.train_s > 0 else 0.0


@dataclass(frozen=True)
class _TrainTotals:
    images: int
    seconds: float
    data_s: float  # waiting for the next batch, the job's `data` phase
    loss: float
    accuracy: float


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader[Any],
    device: torch.device,
    linear_probe: bool,
) -> _TrainTotals:
    """One pass over `loader`, timed from the loader's start to the last optimiser step.

    Time spent waiting for batches is counted apart too, as torchvision's `MetricLogger` does.
    """
    model.train(not linear_probe)  # a frozen backbone keeps its BatchNorm statistics
    images = correct = 0
    loss_sum = waiting = 0.0
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        before = time.perf_counter()
        batch = next(batches, None)
        waiting += time.perf_counter() - before
        if batch is None:
            break
        inputs, targets = batch[0].to(device), batch[1].to(device)
        output = model(inputs)
        loss = criterion(output, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()  # per step, like the job's schedule
        count = targets.numel()
        loss_sum += loss.item() * count  # torchvision's MetricLogger reads the loss every step
        correct += int((output.argmax(dim=1) == targets).sum())
        images += count
    seconds = time.perf_counter() - start
    return _TrainTotals(
        images, seconds, waiting, loss_sum / max(1, images), correct / max(1, images)
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module, criterion: nn.Module, loader: DataLoader[Any], device: torch.device
) -> tuple[float, float]:
    """Loss and top-1 accuracy over `loader`."""
    model.eval()
    images = correct = 0
    loss_sum = 0.0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        output = model(inputs)
        loss_sum += criterion(output, targets).item() * targets.numel()
        correct += int((output.argmax(dim=1) == targets).sum())
        images += targets.numel()
    return loss_sum / max(1, images), correct / max(1, images)


def _transforms(hp: Hyperparameters) -> tuple[transforms.Compose, transforms.Compose]:
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(hp.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    evaluation = transforms.Compose(
        [
            transforms.Resize(round(hp.image_size / 0.875)),
            transforms.CenterCrop(hp.image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, evaluation


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(settings: ReferenceSettings) -> list[EpochResult]:
    """Train and evaluate every epoch; write the result JSON and return the epochs."""
    hp = settings.hp
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_tf, eval_tf = _transforms(hp)
    probe = settings.linear_probe
    train_set = torchvision.datasets.ImageFolder(
        str(settings.data / "train"), eval_tf if probe else train_tf
    )
    valid_set = torchvision.datasets.ImageFolder(str(settings.data / "valid"), eval_tf)
    # Seeded before the model is built, as the job does: both loops start from the same weights.
    _seed(hp.seed)
    model = torchvision.models.get_model(hp.arch, weights=None, num_classes=len(train_set.classes))
    model.to(device)
    if probe:
        model.requires_grad_(False)
        model.get_submodule("fc").requires_grad_(True)

    pin = device.type == "cuda"
    # A last batch of one image breaks BatchNorm in training mode; the job drops it, so do we.
    drop_last = len(train_set) % hp.batch_size == 1
    train_loader = DataLoader(
        train_set,
        batch_size=hp.batch_size,
        shuffle=True,
        num_workers=settings.workers,
        pin_memory=pin,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(hp.seed),
    )
    valid_loader = DataLoader(
        valid_set, batch_size=hp.batch_size, num_workers=settings.workers, pin_memory=pin
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, hp, len(train_loader))
    logger.info(
        "reference: %d train / %d valid images, %d classes, %d torch threads, %d workers, %s",
        len(train_set),
        len(valid_set),
        len(train_set.classes),
        torch.get_num_threads(),
        settings.workers,
        "linear probe" if probe else "fine-tune",
    )

    epochs: list[EpochResult] = []
    for epoch in range(1, hp.epochs + 1):
        start = time.perf_counter()
        totals = train_one_epoch(
            model, criterion, optimizer, scheduler, train_loader, device, probe
        )
        val_loss, val_acc = evaluate(model, criterion, valid_loader, device)
        result = EpochResult(
            epoch=epoch,
            images=totals.images,
            train_s=totals.seconds,
            data_s=totals.data_s,
            wall_s=time.perf_counter() - start,
            train_loss=totals.loss,
            train_acc=totals.accuracy,
            val_loss=val_loss,
            val_acc=val_acc,
        )
        epochs.append(result)
        logger.info(
            "reference epoch %d: %.1f images/s, train %.1f s (data %.1f s), wall %.1f s, "
            "val_acc %.3f",
            epoch,
            result.images_per_sec,
            result.train_s,
            result.data_s,
            result.wall_s,
            val_acc,
        )
    _write_result(settings, epochs)
    return epochs


def _write_result(settings: ReferenceSettings, epochs: list[EpochResult]) -> None:
    record = {
        "setup": {
            "torch_threads": torch.get_num_threads(),
            "loader_workers": settings.workers,
            "linear_probe": settings.linear_probe,
            "hyperparameters": settings.hp.model_dump(mode="json"),
        },
        "epochs": [
            {
                "epoch": e.epoch,
                "images": e.images,
                "train_s": e.train_s,
                "data_s": e.data_s,
                "images_per_sec": e.images_per_sec,
                "wall_s": e.wall_s,
                "train_loss": e.train_loss,
                "train_acc": e.train_acc,
                "val_loss": e.val_loss,
                "val_acc": e.val_acc,
            }
            for e in epochs
        ],
    }
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text(json.dumps(record, indent=1), encoding="utf-8")


def _parse(argv: list[str] | None = None) -> ReferenceSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="ImageFolder root holding train/ and valid/")
    parser.add_argument("--output", type=Path, required=True, help="where to write result JSON")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers (default: 2, one per core here)"
    )
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="train only the head on a frozen backbone, eval transforms on the training set",
    )
    parser.add_argument(
        "--hp",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a job hyperparameter (epochs, lr, batch_size, ...), JSON-decoded like the job does",
    )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for item in args.hp:
        key, _, raw = item.partition("=")
        try:
            values[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.replace("-", "_")] = raw
    return ReferenceSettings(
        data=args.data,
        output=args.output,
        hp=Hyperparameters.model_validate(values),
        workers=args.workers,
        linear_probe=args.linear_probe,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main(_parse())
