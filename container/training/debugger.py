"""SageMaker Debugger (smdebug) hook: optional, isolated, and never able to fail the job.

smdebug 1.0.34 is the last release and predates this stack (CONTRACT.md §4.6). Three small shims
keep it working without pinning the image to old libraries:

- NumPy >= 2.3 removed `ndarray.tostring`, which smdebug's event writer calls: the writer gets a
  `tobytes` version of that one function;
- bf16 tensors (mixed precision) have no NumPy dtype: they are saved as float32;
- smdebug swallows its own errors only for its default configuration and re-raises them for a
  custom one, and its gradient callbacks are not guarded at all: here every error it raises
  disables it for the rest of the job, with the reason logged, and training goes on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DebugHook", "create_hook"]

logger = logging.getLogger(__name__)


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


def create_hook(config: Path, model: nn.Module, criterion: nn.Module) -> DebugHook | None:
    """A hook configured by debughookconfig.json, or None (with the reason logged) when off."""
    if not config.is_file():
        logger.info("SageMaker Debugger off: no %s", config)
        return None
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
