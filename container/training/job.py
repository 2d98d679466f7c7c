"""The training job, top to bottom: build the parts, resume, run the epochs, report, ship the model.

`run_process` is what each training process runs (one per GPU, or one on a CPU host); it turns any
error into /opt/ml/output/failure and an exit code, on rank 0 only.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from container.decoding import Preprocessing
from container.devices import describe_cuda
from container.model import ArtifactError, build, load_backbone_weights
from container.sagemaker_env import PRETRAINED_CHANNEL, write_failure
from container.training import distributed, findings, metrics
from container.training.checkpoint import load_checkpoint, restore, save_checkpoint, snapshot
from container.training.data import build_splits, find_images, probe_images
from container.training.distributed import Rank
from container.training.epochs import evaluate_best, train_epochs, write_model
from container.training.errors import TrainingError, WeightsError, failure_text
from container.training.hardware import plan_hardware
from container.training.loader import LoaderSettings, steps_per_epoch
from container.training.loop import EvalResult
from container.training.optim import build_optimizer, build_scheduler
from container.training.pretrained import find_pretrained
from container.training.profiler import Profiler
from container.training.quantization import quantize
from container.training.reports import evaluation_report, write_evaluation, write_profile
from container.training.rule_recorder import (
    RuleRecorder,
    check_finite_weights,
    gradient_interval,
)
from container.training.settings import TrainSettings
from container.training.state import Parts, RunState, StopRequest
from container.training.trust import assess

__all__ = ["run_process"]

logger = logging.getLogger(__name__)


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


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build(settings: TrainSettings, rank: Rank) -> Parts:
    hp = settings.hp
    prep = Preprocessing.for_image_size(hp.image_size)
    hw = plan_hardware(
        device_choice=hp.device,
        instance_type=settings.instance_type,
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
    splits = build_splits(
        found, distributed.broadcast_object(bad, rank), hp.max_bad_images, hp.train_unknown
    )
    logger.info(
        "%d classes; %s",
        len(splits.class_folders),
        ", ".join(f"{s.channel}: {len(s.samples)} images" for s in splits.channels),
    )
    for image_set in splits.channels:
        if image_set.bad and rank.is_main:
            logger.warning(
                "Channel %s: skipping %d unreadable image(s), e.g. %s (%s)",
                image_set.channel,
                len(image_set.bad),
                image_set.bad[0].path,
                image_set.bad[0].reason,
            )

    _seed(hp.seed)
    model = build(hp.arch, splits.outputs)
    pretrained_from = "random initialisation (pretrained=false)"
    if hp.pretrained:
        source = find_pretrained(
            hp.arch,
            hp.pretrained_weights,
            settings.channels.get(PRETRAINED_CHANNEL),
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


def _run(settings: TrainSettings, rank: Rank, stop: StopRequest) -> None:
    parts = _build(settings, rank)
    checkpoint = load_checkpoint(settings.checkpoint_dir)
    state = RunState() if checkpoint is None else restore(parts, checkpoint)
    if checkpoint is not None:
        logger.info(
            "Resuming from %s: epoch %d, step %d",
            settings.checkpoint_dir,
            state.epoch + 1,
            state.step,
        )
    # The job's own Debugger rules (rank 0): evaluated whether or not SageMaker runs Debugger.
    recorder = (
        RuleRecorder(
            parts.model,
            first_step=state.epoch * parts.steps_per_epoch + state.step,
            interval=gradient_interval(settings.debug_config),
        )
        if rank.is_main
        else None
    )
    if rank.is_main:
        parts.profiler.start()
    try:
        finished = train_epochs(parts, state, stop, recorder)
    finally:
        parts.profiler.stop()
    if not finished:
        if rank.is_main:
            _save_stopped(parts, state)
        return
    results = evaluate_best(parts, state)
    if rank.is_main:
        _finish(parts, state, results, recorder)


def _save_stopped(parts: Parts, state: RunState) -> None:
    """Stopped by a signal (rank 0): a checkpoint to resume from and the best model so far."""
    # Stopped in the step that broke the weights: neither checkpoint nor model of them.
    step = state.epoch * parts.steps_per_epoch + state.step
    check_finite_weights(parts.model.state_dict(), step, parts.settings.hp.lr, parts.hw.precision)
    save_checkpoint(parts.settings.checkpoint_dir, snapshot(parts, state))
    write_model(parts, state, {"val_acc": state.best.val_acc} if state.best else {})
    logger.warning(
        "Stopped in epoch %d at step %d: checkpoint and model saved", state.epoch + 1, state.step
    )


def _finish(
    parts: Parts, state: RunState, results: dict[str, EvalResult], recorder: RuleRecorder | None
) -> None:
    """After the last epoch (rank 0): the model of the best epoch with its final metrics, the
    evaluation and profile reports, and the last metric lines."""
    settings = parts.settings
    best_epoch = state.best.epoch if state.best else None
    final: dict[str, float] = {}
    for name, result in results.items():
        prefix = "val" if name == "valid" else name
        final |= {
            f"{prefix}_loss": result.loss,
            f"{prefix}_top5": result.top5,
            f"{prefix}_acc": result.accuracy,
        }
    trust = assess(parts, results)
    int8 = quantize(parts, trust.policy)
    meta = write_model(parts, state, final, trust.policy, int8)
    out = settings.opt_ml.output_data_dir
    write_evaluation(
        out,
        evaluation_report(
            model_version=meta["model_version"],
            splits=parts.splits,
            results=results,
            history=state.history,
            best_epoch=best_epoch,
            trust=trust,
            int8=None if int8 is None else int8.meta,
        )
        | (recorder.report(state.history, parts.steps_per_epoch) if recorder else {}),
    )
    after = {"calibration and abstention": trust.calibration["seconds"]}
    if int8 is not None:
        after["int8 quantization and gate"] = int8.meta["seconds"]
    profile = {
        "setup": _profile_setup(parts),
        **parts.profiler.to_json(),
        "after_epochs_s": after,
    }
    found = findings.judge(profile)
    findings.log_issues(found)
    write_profile(out, {"findings": [f.to_json() for f in found], **profile})
    if "test" in results:
        metrics.print_line({k: v for k, v in final.items() if k.startswith("test_")}, prefix="test")
    summary = {k: v for k, v in final.items() if k.startswith("val_")}
    metrics.print_line({"best_epoch": best_epoch or 0, **summary}, prefix="final")


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
            write_failure(settings.opt_ml, failure_text(exc))
        return 1
    finally:
        distributed.leave()
    return 0
