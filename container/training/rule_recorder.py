"""What the Debugger rules read, recorded while the job trains, and the stop on a NaN loss.

`rules` holds the rules as pure functions of recorded values; this module records those values on
rank 0 at little cost (the loss the loop reads anyway, per-layer gradient norms every
`gradient_interval` steps, the first forward pass's ReLU inputs through hooks that remove
themselves) and logs a rule the first time it fires. A loss that becomes NaN or infinite cannot be
trained back: `divergence_error` is what stops the job, and `check_finite_weights` keeps a broken
model from being written.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from container.training.debugger import SAVE_INTERVAL
from container.training.errors import DivergenceError
from container.training.rules import (
    EpochLosses,
    GradientRecord,
    StartRecord,
    Verdict,
    exploding_tensor,
    loss_not_decreasing,
    loss_points,
    overfit,
    overtraining,
    poor_weight_initialization,
    vanishing_gradient,
)

__all__ = ["RuleRecorder", "check_finite_weights", "divergence_error", "gradient_interval"]

logger = logging.getLogger(__name__)


def gradient_interval(debug_config: Path) -> int:
    """Steps between gradient records: the hook's save_interval for the gradients collection.

    From debughookconfig.json when SageMaker wrote one (the collection's own save_interval, else
    the hook's, else smdebug's default of 500, smdebug/core/save_config.py); without one,
    `SAVE_INTERVAL`, launch train's default; `save_tensors` saves at a multiple of it.
    """
    try:
        config = json.loads(debug_config.read_text())
    except (OSError, ValueError):
        return SAVE_INTERVAL
    interval: Any = 500
    if isinstance(config, dict):
        interval = (config.get("HookParameters") or {}).get("save_interval", interval)
        for collection in config.get("CollectionConfigurations") or []:
            if isinstance(collection, dict) and collection.get("CollectionName") == "gradients":
                params = collection.get("CollectionParameters") or {}
                interval = params.get("save_interval", interval)
    try:
        return max(1, int(interval))
    except (TypeError, ValueError):
        return SAVE_INTERVAL


_SPREAD_SAMPLE = 65_536  # gradient values sampled for the percentiles: cheap, and plenty for them


def _gradients(model: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
    named = [(n, p.grad.detach()) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return {}, {}
    with torch.no_grad():
        stats = torch.stack(
            [
                torch.stack(
                    [torch.linalg.vector_norm(g), torch.linalg.vector_norm(g, 1) / g.numel()]
                )
                for _, g in named
            ]
        ).tolist()
    names = [n for n, _ in named]
    return (
        {n: float(s[0]) for n, s in zip(names, stats, strict=True)},
        {n: float(s[1]) for n, s in zip(names, stats, strict=True)},
    )


def _gradient_spread(model: nn.Module) -> float:
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return math.nan
    stride = max(1, sum(g.numel() for g in grads) // _SPREAD_SAMPLE)
    with torch.no_grad():
        sample = torch.cat([g.reshape(-1)[::stride].float() for g in grads])
        if not bool(sample.isfinite().all()):
            return math.nan
        low, high = torch.quantile(sample, torch.tensor([0.05, 0.95], device=sample.device))
    return float(high - low)


class _StartWatch:
    """Records the starting weights' statistics: ReLU inputs of the first forward pass, gradient
    spread of the first steps. A pass starts when the network's first layer runs, so the hooks
    see one whole pass of the model or of its backbone (cached features), then remove themselves.
    """

    def __init__(self, model: nn.Module, steps: int) -> None:
        self.record = StartRecord(
            weight_std={
                name: float(p.detach().float().std())
                for name, p in model.named_parameters()
                if name.endswith("weight") and p.dim() > 1
            }
        )
        self._steps = steps
        self._passes = 0
        self._calls: dict[str, int] = {}
        first = next(m for m in model.modules() if next(m.children(), None) is None)
        self._handles: list[RemovableHandle] = [first.register_forward_pre_hook(self._pass)]
        for name, module in model.named_modules():
            if isinstance(module, nn.ReLU):
                hook = functools.partial(self._relu_input, name or "relu")
                self._handles.append(module.register_forward_pre_hook(hook))

    def _pass(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._passes += 1
        if self._passes > 1:
            self.stop_watching()

    def _relu_input(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._passes != 1 or not args or not isinstance(args[0], torch.Tensor):
            return
        # A block's ReLU runs twice per pass: each call is its own activation.
        self._calls[name] = self._calls.get(name, 0) + 1
        with torch.no_grad():
            variance = float(args[0].detach().float().var())
        self.record.relu_input_variance[f"{name}[{self._calls[name]}]"] = variance

    def stop_watching(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def after_step(self, step: int, model: nn.Module) -> None:
        self.stop_watching()
        if step < self._steps:
            self.record.gradient_spread.append((step, _gradient_spread(model)))


class RuleRecorder:
    """What the rules read, recorded while the job trains (rank 0 only), and their log lines.

    After every optimiser step the loop calls `record_gradients`, which reads the gradients every
    `interval` steps, and at every one of the first steps of a run from step 0 for
    poor_weight_initialization; each step's loss comes later, with `record_loss`, when the loop's
    checks read the losses from the device (`step_checks`). `check` evaluates the rules on what
    was recorded (after each epoch, and at the end) and logs each rule the first time it fires.
    """

    def __init__(self, model: nn.Module, *, first_step: int, interval: int) -> None:
        self._model = model
        self.interval = interval
        self.losses: list[tuple[int, float]] = []
        self.gradients: list[GradientRecord] = []
        self._start = _StartWatch(model, steps=10) if first_step == 0 else None
        self._logged: set[str] = set()

    def record_loss(self, step: int, loss: float) -> None:
        """Optimiser step `step`'s loss (NaN and infinity are left out)."""
        if math.isfinite(loss):
            self.losses.append((step, loss))

    def record_gradients(self, step: int) -> None:
        """Right after optimiser step `step`, while the gradients are that step's."""
        if self._start is not None:
            self._start.after_step(step, self._model)
        if step % self.interval == 0:
            l2, mean_abs = _gradients(self._model)
            self.gradients.append(GradientRecord(step, l2, mean_abs))

    def diverged(
        self, step: int, history: Sequence[Mapping[str, Any]], steps_per_epoch: int
    ) -> None:
        """The job is about to stop on a NaN or infinite loss: record the gradients that `step`, the
        last one run, left behind (exploding_tensor's evidence) and log what the rules saw."""
        if not self.gradients or self.gradients[-1].step != step:
            l2, mean_abs = _gradients(self._model)
            self.gradients.append(GradientRecord(step, l2, mean_abs))
        self.check(history, steps_per_epoch)

    def check(self, history: Sequence[Mapping[str, Any]], steps_per_epoch: int) -> list[Verdict]:
        """Every rule's verdict on the run so far; a WARNING line for each that newly fired."""
        epochs = _epochs(history, steps_per_epoch)
        start = self._start.record if self._start is not None else None
        verdicts = [
            loss_not_decreasing(self.losses),
            overfit(epochs),
            overtraining(epochs),
            vanishing_gradient(self.gradients),
            exploding_tensor(self.gradients),
            poor_weight_initialization(start),
        ]
        for verdict in verdicts:
            if verdict["status"] == "issues_found" and verdict["name"] not in self._logged:
                self._logged.add(verdict["name"])
                logger.warning(
                    "Rule %s fired at step %d: %s",
                    verdict["name"],
                    verdict["step"],
                    verdict["message"],
                )
        return verdicts

    def report(self, history: Sequence[Mapping[str, Any]], steps_per_epoch: int) -> dict[str, Any]:
        """evaluation.json's `rules` and the evidence its HTML plots (`rule_evidence`)."""
        start = self._start.record if self._start is not None else None
        names = list(dict.fromkeys(k for r in self.gradients for k in r.l2))
        return {
            "rules": self.check(history, steps_per_epoch),
            "rule_evidence": {
                "losses": {
                    "steps": [s for s, _ in self.losses],
                    "values": [_number(v) for _, v in self.losses],
                    "compared": [[s, _number(v)] for s, v in loss_points(self.losses)],
                },
                "epochs": [
                    {"epoch": e.epoch, "step": e.step, "train_loss": e.train, "val_loss": e.valid}
                    for e in _epochs(history, steps_per_epoch)
                ],
                "gradient_interval": self.interval,
                "gradient_norms": {
                    "steps": [r.step for r in self.gradients],
                    "layers": {n: [_number(r.l2.get(n)) for r in self.gradients] for n in names},
                },
                "relu_input_variance": {
                    k: _number(v) for k, v in (start.relu_input_variance if start else {}).items()
                },
                "gradient_spread": [
                    [s, _number(v)] for s, v in (start.gradient_spread if start else [])
                ],
                "weight_std": {
                    k: _number(v) for k, v in (start.weight_std if start else {}).items()
                },
            },
        }


def _epochs(history: Sequence[Mapping[str, Any]], steps_per_epoch: int) -> list[EpochLosses]:
    return [
        EpochLosses(
            epoch=int(row["epoch"]),
            step=int(row["epoch"]) * steps_per_epoch - 1,
            train=float(row["train_loss"]),
            valid=float(row["val_loss"]),
        )
        for row in history
    ]


def _number(value: float | None) -> float | None:
    """JSON-safe and short: 4 significant digits; NaN and infinity (invalid JSON) become null."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.4g}")


# --- the NaN stop -----------------------------------------------------------------------------


def divergence_error(what: str, step: int, lr: float, precision: str) -> DivergenceError:
    """The error that stops a job whose loss (or weights) became NaN or infinite."""
    return DivergenceError(
        f"{what} at step {step}: training diverged and cannot recover, so the job stopped without "
        f"writing a model. Lower lr (it is {lr:g}), use a longer warmup_epochs, set "
        f"mixed_precision=off (this run used {precision}), and check the training data for "
        "corrupt images or wrong labels"
    )


def check_finite_weights(
    weights: Mapping[str, torch.Tensor], step: int, lr: float, precision: str
) -> None:
    """Raise `divergence_error` when any floating-point tensor holds NaN or infinity."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise divergence_error(
                f"the model's weights became NaN or infinite ({name})", step, lr, precision
            )
