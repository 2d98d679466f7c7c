"""SageMaker Debugger (smdebug) hook: optional, isolated, and never able to fail the job.

smdebug 1.0.34 is the last release and predates this stack (docs/sagemaker-contract.md §3.5). Three
small shims keep it working without pinning the image to old libraries:

- NumPy >= 2.3 removed `ndarray.tostring`, which smdebug's event writer calls: the writer gets a
  `tobytes` version of that one function;
- bf16 tensors (mixed precision) have no NumPy dtype: they are saved as float32;
- smdebug swallows its own errors only for its default configuration and re-raises them for a
  custom one, and its gradient callbacks are not guarded at all: here every error it raises
  disables it for the rest of the job, with the reason logged, and training goes on.

Without SageMaker's DebugHookConfig (an account without Debugger, `make run`), `save_tensors`
makes the job write a debughookconfig.json itself (`own_hook_config`) and start the hook from it
the same way, so the tensors read back with `smdebug.trials.create_trial` either way. That config
ships inside output.tar.gz, for every tuning job, so it saves only what `launch report` reads, and
as smdebug reductions (smdebug/core/reduction_config.py) rather than full tensors: ResNet18's full
gradients and weights are ~45 MB each per save, ~11 GB for a default dog-breed job (~1,250 steps)
saved every SAVE_INTERVAL steps; their reductions are ~190 scalars (~50 kB on disk) per save, ~3.5
MB for that job (~0.3 MB gzipped).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SAVE_INTERVAL", "DebugHook", "create_hook", "own_hook_config", "own_save_interval"]

logger = logging.getLogger(__name__)

SAVE_INTERVAL = 10
"""Steps between gradient records: `launch train --save-interval`'s default for the service's
hook, and the job's own rule recorder's without a debughookconfig.json (rules.py
`gradient_interval`). `save_tensors` saves at `own_save_interval`, a multiple of it or every step,
so its steps and the recorder's nest."""

_MAX_SAVES = 100
"""At most this many gradient saves per job under `save_tensors` (`own_save_interval`)."""

_GRADIENT_REDUCTIONS = "l2_norm,abs_mean,abs_max"
"""What `save_tensors` keeps of each gradient, in smdebug's reduction syntax (smdebug/core/
reduction_config.py `ReductionConfig.from_dict`; read back with `Tensor.reduction_value(step,
"l2")`, `("mean", abs=True)`, `("max", abs=True)`): the L2 norm `launch report` plots, the mean
absolute value VanishingGradient compares with its threshold, and the largest magnitude, where
NaN and infinity show for ExplodingTensor."""

_RELU_INPUT_STEPS = 10
"""relu_input (activations: at 224 px and a batch of 32, the first ReLU's input alone is ~100 MB
a step) is saved as its variance, and for the first TRAIN steps only: PoorWeightInitialization
reads the variance of ReLU inputs over the first `steps=10` steps by default
(https://docs.aws.amazon.com/sagemaker/latest/dg/poor-weight-initialization.html)."""


class DebugHook:
    """The smdebug hook behind three calls the training loop makes: register, set_mode, close."""

    def __init__(self, hook: Any, modes: Any, agent: Any) -> None:
        self._hook = hook
        self._modes = modes
        self._agent = agent

    @property
    def active(self) -> bool:
        return not self._agent.disable_smdebug

    def _guarded(self, what: str, call: Callable[[], object]) -> None:
        if not self.active:
            return
        try:
            call()
        # smdebug can fail in any way at all (it is unmaintained); the job must not.
        except Exception:
            logger.exception(
                "SageMaker Debugger failed to %s; it is off for the rest of the job", what
            )
            self._agent.disable_smdebug = True

    def register(self, model: nn.Module, criterion: nn.Module) -> None:
        self._guarded("register the model", lambda: self._hook.register_module(model))
        self._guarded("register the loss", lambda: self._hook.register_loss(criterion))

    def set_mode(self, training: bool) -> None:
        mode = self._modes.TRAIN if training else self._modes.EVAL
        self._guarded("switch mode", lambda: self._hook.set_mode(mode))

    def close(self) -> None:
        self._guarded("close", self._hook.close)


def _patch_writer() -> None:
    import numpy as np
    from smdebug.core import writer
    from smdebug.core.tfevent import util

    if hasattr(np.ndarray, "tostring"):
        return
    original = util.make_tensor_proto

    @functools.wraps(original)
    def make_tensor_proto(nparray_data: Any, tag: str) -> Any:
        # The one call smdebug makes to the removed `tostring`: build the proto without it.
        if nparray_data.dtype.kind in "USO":
            return original(nparray_data, tag)
        dims = [util.TensorShapeProto.Dim(size=d, name=f"{tag}_{d}") for d in nparray_data.shape]
        _, dtype = util._get_proto_dtype(nparray_data.dtype)
        return util.TensorProto(
            dtype=dtype,
            tensor_content=nparray_data.tobytes(),
            tensor_shape=util.TensorShapeProto(dim=dims),
        )

    writer.make_tensor_proto = make_tensor_proto


def _hook_class() -> tuple[Any, Any, Any]:
    import smdebug.pytorch as smd
    from smdebug.core.error_handling_agent import ErrorHandlingAgent

    agent = ErrorHandlingAgent.get_error_handling_agent()

    class GuardedHook(smd.Hook):  # type: ignore[misc]
        @staticmethod
        def _make_numpy_array(tensor_value: Any) -> Any:
            if isinstance(tensor_value, torch.Tensor) and tensor_value.dtype == torch.bfloat16:
                tensor_value = tensor_value.float()
            return smd.Hook._make_numpy_array(tensor_value)

        def backward_hook(self, tname: str) -> Any:
            # smdebug guards the factory but not the per-gradient callback it returns.
            return agent.catch_smdebug_errors()(super().backward_hook(tname))

    return GuardedHook, smd.modes, agent


def own_save_interval(train_steps: int) -> int:
    """Steps between gradient saves for a job of `train_steps` TRAIN steps: every step while that
    makes at most _MAX_SAVES saves, else the smallest multiple of SAVE_INTERVAL that does (e.g.
    20 for the default dog-breed job's ~1,250 steps: 63 saves)."""
    if train_steps <= _MAX_SAVES:
        return 1
    return SAVE_INTERVAL * math.ceil(train_steps / (SAVE_INTERVAL * _MAX_SAVES))


def own_hook_config(out_dir: Path, train_steps: int) -> dict[str, Any]:
    """The debughookconfig.json `save_tensors` starts the hook with, aimed at `out_dir`: what
    `launch report` reads (launch/report.py, launch/tensor_rules.py) and no more. Losses every
    step (scalars); gradients as reductions at `own_save_interval(train_steps)`; the variance of
    ReLU inputs for the first _RELU_INPUT_STEPS TRAIN steps. No weights or biases: no reader needs
    them (the job records its own weight statistics, rules.py), and a NaN weight follows a NaN
    gradient or loss, which are saved. SageMaker's own DebugHookConfig, when present, is used
    as it is instead (`create_hook`)."""
    return {
        "LocalPath": str(out_dir),
        "HookParameters": {"save_interval": str(own_save_interval(train_steps))},
        "CollectionConfigurations": [
            {"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}},
            {
                "CollectionName": "gradients",
                "CollectionParameters": {"reductions": _GRADIENT_REDUCTIONS},
            },
            {
                "CollectionName": "relu_input",
                "CollectionParameters": {
                    "include_regex": ".*relu_input",
                    "reductions": "variance",
                    "save_interval": "1",
                    "end_step": str(_RELU_INPUT_STEPS),
                    "eval.end_step": "0",  # TRAIN only (smdebug/core/json_config.py prefixes)
                },
            },
        ],
    }


def create_hook(
    config: Path,
    model: nn.Module,
    criterion: nn.Module,
    save_tensors_to: Path | None = None,
    train_steps: int = 0,
) -> DebugHook | None:
    """A hook configured by debughookconfig.json; without one, with `save_tensors_to`, a hook
    configured by `own_hook_config` for a job of `train_steps` TRAIN steps; else None. Why it is
    off, or what decides, is logged."""
    if config.is_file():
        if save_tensors_to is not None:
            logger.info(
                "save_tensors ignored: %s (SageMaker's DebugHookConfig) decides what is saved "
                "and where",
                config,
            )
        return _start(config, model, criterion)
    if save_tensors_to is None:
        logger.info(
            "SageMaker Debugger off: no %s (save_tensors=true records tensors without it)", config
        )
        return None
    if save_tensors_to.is_dir() and any(save_tensors_to.iterdir()):
        # smdebug refuses a finished trial's folder and would mix tensors into an unfinished one.
        logger.warning(
            "SageMaker Debugger off: %s already holds tensors of an earlier run; delete it to "
            "record new ones",
            save_tensors_to,
        )
        return None
    with tempfile.TemporaryDirectory() as folder:
        own = Path(folder) / "debughookconfig.json"
        own.write_text(json.dumps(own_hook_config(save_tensors_to, train_steps)))
        return _start(own, model, criterion)


def _start(config: Path, model: nn.Module, criterion: nn.Module) -> DebugHook | None:
    try:
        hook_class, modes, agent = _hook_class()
        _patch_writer()
        hook = hook_class.create_from_json_file(str(config))
    # Import errors, protobuf/numpy incompatibilities, bad JSON, unknown collections...: whatever
    # goes wrong inside smdebug means "train without it".
    except Exception as exc:
        logger.warning(
            "SageMaker Debugger off: it could not start (%s: %s)", type(exc).__name__, exc
        )
        return None
    # Make smdebug's own error handler catch errors for every configuration, not just the default.
    agent.set_hook(None)
    debug = DebugHook(hook, modes, agent)
    debug.register(model, criterion)
    if debug.active:
        logger.info("SageMaker Debugger on: writing tensors to %s", hook.out_dir)
    return debug
