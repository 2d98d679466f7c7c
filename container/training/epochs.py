"""The epochs of a run: which parameters train, on what batches, and what each epoch leaves behind.

An epoch trains the whole network, or only its head while the backbone is frozen (on cached
backbone features when the inputs are not augmented), evaluates on the valid set, prints its metric
line, and (rank 0) writes the model when it is the best so far and a checkpoint.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL
import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, TensorDataset

from container.abstention import Policy
from container.images import normalize
from container.int8 import META_KEY as INT8_META_KEY
from container.model import save_artifact
from container.training import distributed, metrics
from container.training.checkpoint import save_checkpoint, snapshot
from container.training.data import ImageFolderDataset
from container.training.debugger import DebugHook, create_hook
from container.training.loader import Batch, LoaderSettings, eval_batches, train_batches
from container.training.loop import (
    EpochStats,
    EvalResult,
    evaluate,
    outputs,
    train_one_epoch,
)
from container.training.rule_recorder import (
    RuleRecorder,
    check_finite_weights,
    divergence_error,
)
from container.training.state import Best, Parts, RunState, StopRequest
from container.training.step_checks import NonFiniteLossError, StepChecks, check_interval

if TYPE_CHECKING:  # quantization reads the model through trust, which imports this module
    from container.training.quantization import Int8Result

__all__ = ["evaluate_best", "loading", "train_epochs", "write_model"]

logger = logging.getLogger(__name__)


# --- data ---------------------------------------------------------------------------------------


def loading(parts: Parts, dataset: Dataset[Any], evaluation: bool = False) -> LoaderSettings:
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
    return eval_batches(dataset, loading(parts, dataset, evaluation=True))


def _images(
    parts: Parts, channel: str, augment: bool = False, epoch: int = 0
) -> ImageFolderDataset:
    image_set = {s.channel: s for s in parts.splits.sets}[channel]
    return ImageFolderDataset(
        image_set.samples, parts.prep, augment, seed=parts.settings.hp.seed, epoch=epoch
    )


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
    # The pooled features the head reads (its logits, computed on the way, are not needed).
    result, labels = outputs(
        parts.model, _evaluation_batches(parts, dataset), _prepare_images(parts), parts.hw
    )
    features, labels = distributed.gather_shards((result.features, labels), parts.rank)
    return features, labels


@dataclass
class _FeatureCache:
    train: TensorDataset
    valid: TensorDataset


# --- epochs -------------------------------------------------------------------------------------


def _checks(
    parts: Parts, state: RunState, stop: StopRequest, recorder: RuleRecorder | None
) -> StepChecks:
    """What the loop calls after each step: record it for the rules (rank 0), and every
    `check_steps` fail on a NaN or infinite loss or stop on a signal, every process at one step."""
    return StepChecks(
        rank=parts.rank,
        device=parts.hw.device,
        first_step=state.epoch * parts.steps_per_epoch + state.step,
        interval=check_interval(parts.settings.hp.check_steps, parts.hw.device),
        stop=lambda: bool(stop),
        recorder=recorder,
    )


def _epoch(
    parts: Parts,
    state: RunState,
    stop: StopRequest,
    hook: DebugHook | None,
    cache: _FeatureCache | None,
    recorder: RuleRecorder | None,
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
        train_set = _images(parts, "train", hp.augment, state.epoch)
        valid_set = _images(parts, "valid")
    module = _wrap(trained, parts)
    module.train(not frozen)  # a frozen backbone runs in eval mode: fixed BatchNorm statistics
    if hook is not None:
        hook.set_mode(training=True)
    try:
        stats = train_one_epoch(
            module,
            train_batches(train_set, loading(parts, train_set), state.epoch, state.step),
            prepare,
            criterion=parts.criterion,
            optimizer=parts.optimizer,
            scheduler=parts.scheduler,
            scaler=parts.scaler,
            hw=parts.hw,
            profiler=parts.profiler,
            checks=_checks(parts, state, stop, recorder),
        )
    except NonFiniteLossError as exc:
        if recorder is not None:
            recorder.diverged(exc.last_step, state.history, parts.steps_per_epoch)
        what = (
            "another process's loss" if exc.loss is None else f"the training loss became {exc.loss}"
        )
        raise divergence_error(what, exc.step, hp.lr, parts.hw.precision) from None
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
            num_classes=parts.splits.outputs,
            hw=parts.hw,
            rank=rank,
        )
    reduced = EpochStats(
        loss_sum=float(totals[0]), correct=int(totals[1]), images=int(totals[2]), steps=stats.steps
    )
    return reduced, result


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def write_model(
    parts: Parts,
    state: RunState,
    metrics_: dict[str, Any],
    policy: Policy | None = None,
    int8: Int8Result | None = None,
) -> dict[str, Any]:
    """The artifact of the best model so far (or the current one if no epoch completed); the
    final one carries its calibration and abstention `policy` and its `int8` network."""
    best = state.best
    weights = best.state_dict if best is not None else parts.model.state_dict()
    settings = parts.settings
    step = state.epoch * parts.steps_per_epoch + state.step
    check_finite_weights(weights, step, settings.hp.lr, parts.hw.precision)
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
            **({"abstention": policy.to_meta()} if policy is not None else {}),
            **({INT8_META_KEY: int8.meta} if int8 is not None else {}),
        },
        feature_stats=policy.gaussian.to_tensors() if policy and policy.gaussian else None,
        int8_state=int8.state if int8 is not None else None,
    )


def train_epochs(
    parts: Parts, state: RunState, stop: StopRequest, recorder: RuleRecorder | None = None
) -> bool:
    """Run the remaining epochs; False when stopped by a signal before the end. `recorder` (rank
    0) records what the Debugger rules read and logs them as they fire."""
    settings, rank = parts.settings, parts.rank
    hp = settings.hp
    hook = (
        create_hook(
            settings.debug_config,
            parts.model,
            parts.criterion,
            settings.opt_ml.debug_tensors_dir if hp.save_tensors else None,
            # The steps left to run: smdebug counts its steps from 0 in each process.
            train_steps=(hp.epochs - state.epoch) * parts.steps_per_epoch,
        )
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
                    train = TensorDataset(*_gather_features(parts, _images(parts, "train")))
                with parts.profiler.phase("evaluation"):
                    valid = TensorDataset(*_gather_features(parts, _images(parts, "valid")))
                cache = _FeatureCache(train, valid)
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
            stats, result = _epoch(parts, state, stop, hook, cache, recorder)
            if result is None:
                return False
            if not (math.isfinite(stats.loss) and math.isfinite(result.loss)):
                # Identical on every process (reduced): all stop here, none ships this model.
                step = (state.epoch + 1) * parts.steps_per_epoch - 1
                if recorder is not None:
                    recorder.diverged(step, state.history, parts.steps_per_epoch)
                raise divergence_error(
                    f"the validation loss became {result.loss} (training loss {stats.loss:.4g})",
                    step,
                    hp.lr,
                    parts.hw.precision,
                )
            state.epoch += 1
            state.step = 0
            row = {
                "epoch": state.epoch,
                "train_loss": stats.loss,
                "train_acc": stats.accuracy,
                "lr": parts.optimizer.param_groups[0]["lr"],
                "images_per_sec": parts.profiler.images_per_sec(stats.images),
                "val_loss": result.loss,
                "val_top5": result.top5,
                "val_acc": result.accuracy,
            }
            state.history.append(row)
            if recorder is not None:
                recorder.check(state.history, parts.steps_per_epoch)
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
                        write_model(parts, state, {"val_acc": result.accuracy})
                    if state.epoch % hp.checkpoint_epochs == 0 or state.epoch == hp.epochs:
                        save_checkpoint(settings.checkpoint_dir, snapshot(parts, state))
                        logger.info("Checkpoint saved after epoch %d", state.epoch)
            parts.profiler.end_epoch(state.epoch, stats.images)
        return True
    finally:
        if hook is not None:
            hook.close()
        if tensorboard is not None:
            tensorboard.close()


def evaluate_best(parts: Parts, state: RunState) -> dict[str, EvalResult]:
    """The shipped (best) model on valid and, when given, test."""
    if state.best is not None:
        parts.model.load_state_dict(state.best.state_dict)
    _set_frozen(parts.model, False)
    results = {}
    for image_set in parts.splits.sets[1:]:
        results[image_set.channel] = evaluate(
            parts.model,
            _evaluation_batches(parts, _images(parts, image_set.channel)),
            _prepare_images(parts),
            criterion=parts.criterion,
            num_classes=parts.splits.outputs,
            hw=parts.hw,
            rank=parts.rank,
            keep_outputs=True,
        )
    return results
