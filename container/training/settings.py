"""The training job's settings, read once from /opt/ml and the environment at the program's edge."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from container.sagemaker_env import (
    Channel,
    ConfigFileError,
    OptMl,
    read_channels,
    read_checkpoint_dir,
    read_hyperparameters,
    read_resource_config,
    read_tensorboard_dir,
)
from container.training.distributed import World, plan_world
from container.training.errors import ConfigError
from container.training.hyperparameters import Hyperparameters

__all__ = ["TrainSettings", "read_settings"]

# What the training toolkit and SDK v3 use (docs/sagemaker-contract.md §2.6).
_DEFAULT_MASTER_PORT = 7777


@dataclass(frozen=True)
class TrainSettings:
    """Everything the job is told, typed and resolved; never mutated."""

    hp: Hyperparameters
    opt_ml: OptMl
    channels: dict[str, Channel]
    world: World
    checkpoint_dir: Path
    tensorboard_dir: Path | None
    debug_config: Path
    hub_dir: Path
    scratch_dir: Path
    job_name: str | None
    instance_type: str | None
    """resourceconfig.json's current_instance_type: a GPU type requires a usable GPU."""


def read_settings(environ: Mapping[str, str]) -> TrainSettings:
    """Read the config files under SAGEMAKER_BASE_DIR (default /opt/ml); ConfigError if unusable."""
    opt_ml = OptMl.from_environ(environ)
    try:
        hp = read_hyperparameters(opt_ml, Hyperparameters)
        channels = read_channels(opt_ml)
        resources = read_resource_config(opt_ml)
        checkpoint_dir = read_checkpoint_dir(opt_ml)
        tensorboard_dir = read_tensorboard_dir(opt_ml)
    except ConfigFileError as exc:
        raise ConfigError(str(exc)) from exc
    port = environ.get("MASTER_PORT", str(_DEFAULT_MASTER_PORT))
    if not port.isdigit():
        raise ConfigError(f"MASTER_PORT={port!r} is not a port number")
    tree = hashlib.sha1(str(opt_ml.base.resolve()).encode()).hexdigest()[:10]
    return TrainSettings(
        hp=hp,
        opt_ml=opt_ml,
        channels=channels,
        world=plan_world(resources, hp.processes_per_host, int(port), use_gpus=hp.device != "cpu"),
        checkpoint_dir=checkpoint_dir,
        tensorboard_dir=tensorboard_dir,
        debug_config=Path(environ.get("SMDEBUG_CONFIG_FILE_PATH", opt_ml.debughookconfig_file)),
        hub_dir=Path(torch.hub.get_dir()),
        # Scratch for unpacked archives: /tmp is not synced to S3 (docs/sagemaker-contract.md §2.1).
        scratch_dir=Path(tempfile.gettempdir()) / "train-scratch" / tree,
        job_name=environ.get("TRAINING_JOB_NAME"),
        instance_type=resources.current_instance_type,
    )
