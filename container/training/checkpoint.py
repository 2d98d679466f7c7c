"""Checkpoints that survive a kill: everything needed to resume exactly, written atomically.

One file, `last.pt`, in the checkpoint dir that SageMaker syncs to S3 (and restores on a spot
restart): model, optimiser, scheduler and grad-scaler state, the position in the run (epoch and
step within it), the best model so far, the metric history and every RNG state. It is written to a
temporary name and renamed, so a kill leaves either the old or the new file, never half of one.
Only plain containers and tensors are stored, so it loads with `weights_only=True`.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from container.atomic import write_atomically
from container.training.errors import ConfigError, ResourceError, TrainingError
from container.training.state import Best, Parts, RunState

__all__ = [
    "CHECKPOINT_FILE",
    "load_checkpoint",
    "restore",
    "save_checkpoint",
    "snapshot",
]


CHECKPOINT_FILE = "last.pt"
FORMAT_VERSION = 1
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True)
    )
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_synced(path: Path, data: memoryview) -> None:
    """Write and fsync: the rename that follows must not land before the data (a spot kill)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write `state` to directory/last.pt atomically; ResourceError when the disk is too full.

    The state is serialised in memory first, so the free space can be checked against its real
    size and a failed write surfaces as an OSError with its errno (torch.save's own file writer
    reports a full disk as an opaque "unexpected pos" RuntimeError).
    """
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    data = buffer.getbuffer()
    path = directory / CHECKPOINT_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if free < len(data):
            raise OSError(errno.ENOSPC, "not enough space")
        write_atomically(path, lambda tmp: _write_synced(tmp, data))
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise ResourceError(
                f"no space left for checkpoints in {directory}: a checkpoint needs "
                f"{len(data) / 2**20:.0f} MB, {shutil.disk_usage(directory).free / 2**20:.0f} MB "
                "are free; free space there or raise the job's VolumeSizeInGB"
            ) from exc
        raise ResourceError(f"cannot write checkpoint {path}: {exc.strerror}") from exc
    return path


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The state saved in directory/last.pt, or None when there is none."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise TrainingError(
            f"checkpoint {path} is unreadable ({exc}); delete it (or the S3 checkpoint prefix) "
            "to start over"
        ) from exc
    if state.get("format_version") != FORMAT_VERSION:
        raise TrainingError(
            f"checkpoint {path} has format {state.get('format_version')!r}, this image reads "
            f"{FORMAT_VERSION}; delete it to start over"
        )
    return state


def snapshot(parts: Parts, state: RunState) -> dict[str, Any]:
    """Everything a resumed run needs, as plain containers and tensors."""
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
        "rng": _rng_state(),
        "classes": parts.splits.class_folders,
        "arch": parts.settings.hp.arch,
        "image_size": parts.settings.hp.image_size,
    }


def restore(parts: Parts, checkpoint: dict[str, Any]) -> RunState:
    """Put a checkpoint's state into `parts` and return the run's progress."""
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
    _restore_rng(checkpoint["rng"])
    best = checkpoint["best"]
    return RunState(
        epoch=checkpoint["epoch"],
        step=checkpoint["step"],
        best=None if best is None else Best(best["epoch"], best["val_acc"], best["state_dict"]),
        history=list(checkpoint["history"]),
    )
