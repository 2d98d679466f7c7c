"""The training job, top to bottom: data, model, resume, epochs, reports, artifact.

`run_process` is what each training process runs (one per GPU, or one on a CPU host); it turns any
error into /opt/ml/output/failure and an exit code, on rank 0 only.
"""

from __future__ import annotations

import logging
import platform
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset
from torchvision.models import ResNet

from container.images import Preprocessing, normalize
from container.model import (
    ArtifactError,
    backbone,
    build,
    load_backbone_weights,
    save_artifact,
)
from container.sagemaker_env import write_failure
from container.training import distributed, metrics
from container.training.checkpoint import (
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from container.training.data import (
    DatasetSplits,
    ImageFolderDataset,
    build_splits,
    find_images,
    probe_images,
)
from container.training.debugger import DebugHook, create_hook
from container.training.distributed import Rank
from container.training.errors import ConfigError, TrainingError, WeightsError
from container.training.hardware import Hardware, describe_cuda, plan_hardware
from container.training.loader import (
    Batch,
    LoaderSettings,
    eval_batches,
    steps_per_epoch,
    train_batches,
)
from container.training.loop import (
    EpochStats,
    EvalResult,
    evaluate,
    extract_features,
    train_one_epoch,
)
from container.training.optim import build_optimizer, build_scheduler
from container.training.pretrained import find_pretrained
from container.training.profiler import Profiler
from container.training.reports import evaluation_report, write_evaluation, write_profile
from container.training.settings import TrainSettings

__all__ = ["run_process"]

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
                "%s received: finishing the current step, then saving a checkpoint and the model",
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


# --- data loading -------------------------------------------------------------------------------


def _loading(parts: Parts, dataset: Dataset[Any], evaluation: bool = False) -> LoaderSettings:
    hp = parts.settings.hp
    return LoaderSettings(
        # Evaluation keeps no activations for backward: twice the batch fits.
        batch_size=hp.batch_size * (2 if evaluation else 1),
        # Cached features are tensors in memory: workers would only add copies.
        workers=parts.hw.workers if isinstance(dataset, ImageFolderDataset) else 0,
        pin_memory=parts.hw.device.type == "cuda",
        seed=hp.seed,
        rank=parts.rank,
    )


def _evaluation_batches(parts: Parts, dataset: Dataset[Any]) -> Iterator[Batch]:
    return eval_batches(dataset, _loading(parts, dataset, evaluation=True))


def _images(parts: Parts, channel: str, augment: bool) -> ImageFolderDataset:
    image_set = {s.channel: s for s in parts.splits.sets}[channel]
    return ImageFolderDataset(image_set.samples, parts.prep, augment=augment)


def _prepare_images(parts: Parts) -> Callable[[torch.Tensor], torch.Tensor]:
    channels_last = parts.settings.hp.channels_last
    return lambda batch: normalize(batch, parts.prep, parts.hw.device, channels_last)


def _prepare_features(parts: Parts) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda batch: batch.to(parts.hw.device, non_blocking=True)


# --- model phases -------------------------------------------------------------------------------


def _set_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze everything but the head; a frozen backbone also keeps its BatchNorm statistics."""
    for name, param in model.named_parameters():
        param.requires_grad = not frozen or name.startswith("fc.")


def _wrap(module: nn.Module, parts: Parts) -> nn.Module:
    # DDP registers gradient hooks for the parameters that need grad when it is built, so it is
    # rebuilt whenever the frozen set changes.
    if not parts.rank.distributed:
        return module
    devices = [parts.hw.device] if parts.hw.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=devices)


def _gather_features(
    parts: Parts, dataset: ImageFolderDataset
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of a whole set, each process computing its share."""
    features, labels = extract_features(
        backbone(parts.model), _evaluation_batches(parts, dataset), _prepare_images(parts), parts.hw
    )
    if not parts.rank.distributed:
        return features, labels
    shards: list[Any] = [None] * parts.rank.world_size
    torch.distributed.all_gather_object(shards, (features, labels))
    # Process r holds items r, r + world, r + 2 * world, ...: interleave them back into order.
    full_features = torch.empty(len(dataset), features.shape[1])
    full_labels = torch.empty(len(dataset), dtype=labels.dtype)
    for r, (f, lab) in enumerate(shards):
        full_features[r :: parts.rank.world_size] = f
        full_labels[r :: parts.rank.world_size] = lab
    return full_features, full_labels


@dataclass
class _FeatureCache:
    train: TensorDataset
    valid: TensorDataset


# --- epochs -------------------------------------------------------------------------------------


def _epoch(
    parts: Parts,
    state: RunState,
    stop: StopRequest,
    hook: DebugHook | None,
    cache: _FeatureCache | None,
) -> tuple[EpochStats, EvalResult | None]:
    """Train one epoch (resuming at state.step) and, unless stopped, evaluate it."""
    hp, rank = parts.settings.hp, parts.rank
    frozen = state.epoch < hp.frozen_epochs
    _set_frozen(parts.model, frozen)
    trained: nn.Module
    train_set: Dataset[Any]
    valid_set: Dataset[Any]
    if cache is not None:
        trained, train_set, valid_set = parts.model.fc, cache.train, cache.valid
        prepare = _prepare_features(parts)
    else:
        trained, prepare = parts.model, _prepare_images(parts)
        train_set, valid_set = _images(parts, "train", hp.augment), _images(parts, "valid", False)
    module = _wrap(trained, parts)
    module.train(not frozen)  # a frozen backbone runs in eval mode: fixed BatchNorm statistics
    if hook is not None:
        hook.set_mode(training=True)
    stats = train_one_epoch(
        module,
        train_batches(train_set, _loading(parts, train_set), state.epoch, state.step),
        prepare,
        criterion=parts.criterion,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        scaler=parts.scaler,
        hw=parts.hw,
        profiler=parts.profiler,
        should_stop=lambda: distributed.any_true(bool(stop), rank, parts.hw.device),
    )
    totals = torch.tensor(
        [stats.loss_sum, stats.correct, stats.images], dtype=torch.float64, device=parts.hw.device
    )
    totals = distributed.all_reduce_sum(totals, rank).cpu()
    state.step += stats.steps
    if stats.stopped:
        return stats, None
    if hook is not None:
        hook.set_mode(training=False)
    with parts.profiler.phase("evaluation"):
        result = evaluate(
            trained,
            _evaluation_batches(parts, valid_set),
            prepare,
            criterion=parts.criterion,
            num_classes=len(parts.splits.class_folders),
            hw=parts.hw,
            rank=rank,
        )
    reduced = EpochStats(
        loss_sum=float(totals[0]), correct=int(totals[1]), images=int(totals[2]), steps=stats.steps
    )
    return reduced, result


def _checkpoint_state(parts: Parts, state: RunState) -> dict[str, Any]:
    best = state.best
    return {
        "epoch": state.epoch,
        "step": state.step,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "best": None
        if best is None
        else {"epoch": best.epoch, "val_acc": best.val_acc, "state_dict": best.state_dict},
        "history": state.history,
        "rng": rng_state(),
        "classes": parts.splits.class_folders,
        "arch": parts.settings.hp.arch,
        "image_size": parts.settings.hp.image_size,
    }


def _resume(parts: Parts, checkpoint: dict[str, Any]) -> RunState:
    hp = parts.settings.hp
    path = parts.settings.checkpoint_dir
    for key, ours in (
        ("classes", parts.splits.class_folders),
        ("arch", hp.arch),
        ("image_size", hp.image_size),
    ):
        theirs = checkpoint[key]
        if (tuple(theirs) if isinstance(theirs, list | tuple) else theirs) != ours:
            raise ConfigError(
                f"the checkpoint in {path} was written for a different {key} ({str(theirs)[:80]}); "
                "point checkpoint_s3_uri at a new prefix or delete the old checkpoint"
            )
    parts.model.load_state_dict(checkpoint["model"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    parts.scheduler.load_state_dict(checkpoint["scheduler"])
    parts.scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["rng"])
    best = checkpoint["best"]
    return RunState(
        epoch=checkpoint["epoch"],
        step=checkpoint["step"],
        best=None if best is None else Best(best["epoch"], best["val_acc"], best["state_dict"]),
        history=list(checkpoint["history"]),
    )


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def _write_model(parts: Parts, state: RunState, metrics_: dict[str, Any]) -> dict[str, Any]:
    """The artifact of the best model so far (or the current one if no epoch completed)."""
    best = state.best
    weights = best.state_dict if best is not None else parts.model.state_dict()
    settings = parts.settings
    return save_artifact(
        settings.opt_ml.model_dir,
        weights,
        arch=settings.hp.arch,
        classes=parts.splits.classes,
        preprocessing=parts.prep,
        extra_meta={
            "class_folders": list(parts.splits.class_folders),
            "best_epoch": None if best is None else best.epoch,
            "epochs_completed": len(state.history),
            "metrics": metrics_,
            "hyperparameters": settings.hp.model_dump(mode="json"),
            "pretrained_from": parts.pretrained_from,
            "training_job_name": settings.job_name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
        },
    )


def _final_evaluation(parts: Parts, state: RunState) -> dict[str, EvalResult]:
    """The shipped (best) model on valid and, when given, test."""
    if state.best is not None:
        parts.model.load_state_dict(state.best.state_dict)
    _set_frozen(parts.model, False)
    results = {}
    for image_set in parts.splits.sets[1:]:
        results[image_set.channel] = evaluate(
            parts.model,
            _evaluation_batches(parts, _images(parts, image_set.channel, False)),
            _prepare_images(parts),
            criterion=parts.criterion,
            num_classes=len(parts.splits.class_folders),
            hw=parts.hw,
            rank=parts.rank,
        )
    return results


def _profile_setup(parts: Parts) -> dict[str, Any]:
    hp = parts.settings.hp
    return {
        "device": str(parts.hw.device),
        "precision": parts.hw.precision,
        "channels_last": hp.channels_last,
        "cpu_threads": parts.hw.threads,
        "loader_workers": parts.hw.workers,
        "batch_size": hp.batch_size,
        "image_size": hp.image_size,
        "world_size": parts.rank.world_size,
        "arch": hp.arch,
        "cuda": describe_cuda(),
    }


# --- the job ------------------------------------------------------------------------------------


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build(settings: TrainSettings, rank: Rank) -> Parts:
    hp = settings.hp
    prep = Preprocessing.for_image_size(hp.image_size)
    hw = plan_hardware(
        local_rank=rank.local_rank,
        local_world_size=rank.local_world_size,
        precision=hp.mixed_precision,
        workers=hp.workers,
        batch_bytes=hp.batch_size * hp.image_size**2 * 3,
    )
    torch.set_num_threads(hw.threads)
    logger.info(
        "Device %s, precision %s, %d CPU threads, %d loader workers; %s",
        hw.device,
        hw.precision,
        hw.threads,
        hw.workers,
        describe_cuda(),
    )
    found = find_images(settings.channels, settings.scratch_dir)
    bad = probe_images(found, hw.threads) if rank.is_main else None
    splits = build_splits(found, distributed.broadcast_object(bad, rank), hp.max_bad_images)
    logger.info(
        "%d classes; %s",
        len(splits.class_folders),
        ", ".join(f"{s.channel}: {len(s.samples)} images" for s in splits.sets),
    )
    for image_set in splits.sets:
        if image_set.bad and rank.is_main:
            logger.warning(
                "Channel %s: skipping %d unreadable image(s), e.g. %s (%s)",
                image_set.channel,
                len(image_set.bad),
                image_set.bad[0].path,
                image_set.bad[0].reason,
            )

    _seed(hp.seed)
    model = build(hp.arch, len(splits.class_folders))
    pretrained_from = "random initialisation (pretrained=false)"
    if hp.pretrained:
        source = find_pretrained(
            hp.arch,
            hp.pretrained_weights,
            settings.channels.get("pretrained"),
            settings.hub_dir,
            settings.scratch_dir,
        )
        try:
            load_backbone_weights(model, source.state_dict)
        except ArtifactError as exc:
            raise WeightsError(f"{source.origin}: {exc}") from exc
        pretrained_from = source.origin
    logger.info("Starting weights: %s", pretrained_from)
    memory_format = torch.channels_last if hp.channels_last else torch.preserve_format
    model = model.to(hw.device, memory_format=memory_format)

    steps = steps_per_epoch(
        len(splits.train.samples),
        LoaderSettings(hp.batch_size, hw.workers, pin_memory=False, seed=hp.seed, rank=rank),
    )
    optimizer = build_optimizer(model, hp)
    return Parts(
        settings=settings,
        rank=rank,
        hw=hw,
        prep=prep,
        splits=splits,
        model=model,
        criterion=nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, hp, steps),
        scaler=torch.amp.GradScaler(hw.device.type, enabled=hw.grad_scaler),
        profiler=Profiler(hw.device),
        steps_per_epoch=steps,
        pretrained_from=pretrained_from,
    )


def _train(parts: Parts, state: RunState, stop: StopRequest) -> bool:
    """Run the remaining epochs; False when stopped by a signal before the end."""
    settings, rank = parts.settings, parts.rank
    hp = settings.hp
    hook = (
        create_hook(settings.debug_config, parts.model, parts.criterion)
        if (rank.is_main and hp.debugger == "auto")
        else None
    )
    tensorboard = None
    if rank.is_main and settings.tensorboard_dir is not None:
        from tensorboardX import SummaryWriter

        tensorboard = SummaryWriter(str(settings.tensorboard_dir))
    cache: _FeatureCache | None = None
    try:
        while state.epoch < hp.epochs:
            if state.epoch < hp.frozen_epochs and not hp.augment and cache is None:
                # Frozen backbone, fixed inputs: its features are the same every epoch.
                with parts.profiler.phase("data"):
                    cache = _FeatureCache(
                        TensorDataset(*_gather_features(parts, _images(parts, "train", False))),
                        TensorDataset(*_gather_features(parts, _images(parts, "valid", False))),
                    )
                logger.info("Cached backbone features for the frozen epochs")
            if state.epoch >= hp.frozen_epochs:
                cache = None
            logger.info(
                "Epoch %d/%d: %d steps%s%s",
                state.epoch + 1,
                hp.epochs,
                parts.steps_per_epoch,
                f" from step {state.step}" if state.step else "",
                ", backbone frozen" if state.epoch < hp.frozen_epochs else "",
            )
            stats, result = _epoch(parts, state, stop, hook, cache)
            if result is None:
                return False
            state.epoch += 1
            state.step = 0
            profile = parts.profiler.end_epoch(state.epoch, stats.images)
            row = {
                "epoch": state.epoch,
                "train_loss": stats.loss,
                "train_acc": stats.accuracy,
                "lr": parts.optimizer.param_groups[0]["lr"],
                "images_per_sec": profile.images_per_sec,
                "val_loss": result.loss,
                "val_top5": result.top5,
                "val_acc": result.accuracy,
            }
            state.history.append(row)
            if state.best is None or result.accuracy > state.best.val_acc:
                state.best = Best(
                    state.epoch,
                    result.accuracy,
                    {k: v.detach().cpu().clone() for k, v in parts.model.state_dict().items()},
                )
            if rank.is_main:
                metrics.print_line(row)
                if tensorboard is not None:
                    for key, value in row.items():
                        tensorboard.add_scalar(key, value, state.epoch)
                    tensorboard.flush()
                with parts.profiler.phase("checkpoint"):
                    if state.best.epoch == state.epoch:
                        _write_model(parts, state, {"val_acc": result.accuracy})
                    save_checkpoint(settings.checkpoint_dir, _checkpoint_state(parts, state))
        return True
    finally:
        if hook is not None:
            hook.close()
        if tensorboard is not None:
            tensorboard.close()


def _run(settings: TrainSettings, rank: Rank, stop: StopRequest) -> None:
    parts = _build(settings, rank)
    checkpoint = load_checkpoint(settings.checkpoint_dir)
    state = RunState() if checkpoint is None else _resume(parts, checkpoint)
    if checkpoint is not None:
        logger.info(
            "Resuming from %s: epoch %d, step %d",
            settings.checkpoint_dir,
            state.epoch + 1,
            state.step,
        )
    if rank.is_main:
        parts.profiler.start()
    try:
        finished = _train(parts, state, stop)
    finally:
        parts.profiler.stop()
    if not finished:
        if rank.is_main:
            save_checkpoint(settings.checkpoint_dir, _checkpoint_state(parts, state))
            _write_model(parts, state, {"val_acc": state.best.val_acc} if state.best else {})
            logger.warning(
                "Stopped in epoch %d at step %d: checkpoint and model saved",
                state.epoch + 1,
                state.step,
            )
        return

    results = _final_evaluation(parts, state)
    if not rank.is_main:
        return
    best_epoch = state.best.epoch if state.best else None
    final: dict[str, float] = {}
    for name, result in results.items():
        prefix = "val" if name == "valid" else name
        final |= {
            f"{prefix}_loss": result.loss,
            f"{prefix}_top5": result.top5,
            f"{prefix}_acc": result.accuracy,
        }
    meta = _write_model(parts, state, final)
    out = settings.opt_ml.output_data_dir
    write_evaluation(
        out,
        evaluation_report(
            model_version=meta["model_version"],
            splits=parts.splits,
            results=results,
            history=state.history,
            best_epoch=best_epoch,
        ),
    )
    write_profile(out, {"setup": _profile_setup(parts), **parts.profiler.to_json()})
    if "test" in results:
        metrics.print_line({k: v for k, v in final.items() if k.startswith("test_")}, prefix="test")
    summary = {k: v for k, v in final.items() if k.startswith("val_")}
    metrics.print_line({"best_epoch": best_epoch or 0, **summary}, prefix="final")


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, TrainingError):
        return f"{type(exc).__name__}: {exc}"
    tail = "".join(traceback.format_exception(exc)[-3:])
    return (
        f"InternalError: {type(exc).__name__}: {exc}\n"
        "This is a bug in the training image, not in your data or settings; the job log has the "
        f"traceback.\n{tail}"
    )


def configure_logging(rank: Rank) -> None:
    # Other ranks log warnings only, so the job log reads as one process's story.
    logging.basicConfig(
        level=logging.INFO if rank.is_main else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {rank.rank}] %(name)s: %(message)s",
        force=True,
    )


def run_process(settings: TrainSettings, local_rank: int) -> int:
    """One training process: run the job, report a failure (rank 0), return the exit code."""
    rank = settings.world.rank(local_rank)
    configure_logging(rank)
    stop = StopRequest()
    stop.install()
    try:
        distributed.join(settings.world, rank)
        _run(settings, rank, stop)
    except Exception as exc:
        if isinstance(exc, TrainingError):
            logger.error("%s", exc)
        else:
            logger.exception("Training failed")
        if rank.is_main:
            write_failure(settings.opt_ml, _failure_text(exc))
        return 1
    finally:
        distributed.leave()
    return 0
