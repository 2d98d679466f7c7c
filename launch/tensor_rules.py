"""Debugger's built-in rules on a job's saved tensors, run here with smdebug's rule API.

For an account that SageMaker Debugger is closed to (AWS docs, "Debugger availability change"),
no rule job ever reads the tensors. smdebug 1.0.34, the last release, ships the rule machinery
(`smdebug/rules/rule.py`: `Rule.invoke_at_step`; `smdebug/rules/rule_invoker.py`: `invoke_rule`,
which turns a rule's True into `RuleEvaluationConditionMet`) but not the built-in rules themselves,
which live only in AWS's rule image (`smdebug/rules/__init__.py` exports Rule, RequiredTensors and
invoke_rule, nothing more). So the rules below restate four built-ins on that API, with the
behaviour and default parameters of AWS's "List of Debugger built-in rules"
(https://docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html; the same text in
awsdocs/amazon-sagemaker-developer-guide, doc_source/debugger-built-in-rules.md), and `evaluate`
walks each over the saved steps with `invoke_rule`, as the rule job would; the first step where a
rule holds is its verdict. The job evaluates the same rules itself from what it records anyway
(container/training/rules.py, evaluation.json "rules"); these read the saved tensors instead.

The tensors are full values where the service's hook saved them, and smdebug reductions where the
job's own hook did (`save_tensors`: container/training/debugger.py `own_hook_config`); a reduced
tensor's `value()` raises TensorUnavailableForStep (smdebug/core/tensor.py), so each rule reads
the full value when there is one and the reduction it needs otherwise (`reduction_value`).

Importing this module imports smdebug (and, through it, torch): `launch report` imports it only
when there are tensors to read.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from smdebug import modes
from smdebug.exceptions import RuleEvaluationConditionMet, TensorUnavailableForStep
from smdebug.rules import Rule, invoke_rule

__all__ = ["RULES", "TensorVerdict", "evaluate", "l2_norm"]

Status = Literal["ok", "issues_found", "not_evaluated"]


@dataclass(frozen=True)
class TensorVerdict:
    """One rule's result, in the shape of the job's own verdicts in evaluation.json."""

    name: str
    status: Status
    step: int | None
    message: str


def _full(tensor: Any, step: int, mode: Any = modes.GLOBAL) -> Any | None:
    """The saved value at `step`, or None where only reductions of it were saved."""
    try:
        return tensor.value(step, mode=mode)
    except TensorUnavailableForStep:
        return None


def _reduction(tensor: Any, step: int, name: str, absolute: bool, mode: Any = modes.GLOBAL) -> Any:
    """A saved reduction (smdebug's names: "l2", "mean", "max"...), or None where it was not
    saved."""
    try:
        return tensor.reduction_value(step, name, mode=mode, abs=absolute)
    except TensorUnavailableForStep:
        return None


def l2_norm(tensor: Any, step: int, mode: Any = modes.GLOBAL) -> float | None:
    """A tensor's L2 norm at `step`: from its full value, else from its "l2" reduction; None
    without either."""
    value = _full(tensor, step, mode)
    if value is not None:
        return math.sqrt(float((value.astype("float64") ** 2).sum()))
    norm = _reduction(tensor, step, "l2", absolute=False, mode=mode)
    return None if norm is None else float(norm)


def _mean_abs(tensor: Any, step: int) -> float | None:
    value = _full(tensor, step)
    if value is not None:
        return float(np.abs(value.astype("float64")).mean())
    mean = _reduction(tensor, step, "mean", absolute=True)
    return None if mean is None else float(mean)


def _finite(tensor: Any, step: int) -> bool | None:
    """Whether every value at `step` is finite. From reductions alone: whether every saved one
    is, since a NaN or infinite element makes a max, a norm or a mean NaN or infinite; None when
    nothing of it was saved."""
    value = _full(tensor, step)
    if value is not None:
        return bool(np.isfinite(value).all())
    saved = tensor.reduction_values(step)
    if not saved:
        return None
    return all(bool(np.isfinite(v).all()) for v in saved.values())


class _TensorRule(Rule):  # type: ignore[misc]  # smdebug is untyped
    """A built-in rule's check at one global step; `evaluated` says whether any step had the
    tensors it needs, `message` what it saw when it held."""

    def __init__(self, trial: Any) -> None:
        super().__init__(trial, action_str="")
        self.steps: list[int] = trial.steps()
        self.evaluated = False
        self.message = ""

    def _tensors(self, collection: str, step: int) -> Iterable[tuple[str, Any]]:
        """The collection's tensors saved (in full or as reductions) at `step`."""
        for name in self.base_trial.tensor_names(collection=collection):
            tensor = self.base_trial.tensor(name)
            if step in tensor.steps():
                yield name, tensor

    def _losses(self, step: int) -> list[float]:
        """The losses at `step`: scalars, always saved in full (smdebug never reduces the
        losses collection: NON_REDUCTION_COLLECTIONS, smdebug/core/collection.py)."""
        return [float(np.mean(t.value(step))) for _, t in self._tensors("losses", step)]


class VanishingGradient(_TensorRule):
    """A gradient whose mean absolute value (its "abs_mean" reduction where only reductions were
    saved) is below `threshold` (default 0.0000001)."""

    threshold = 1e-7

    def invoke_at_step(self, step: int) -> bool:
        for name, tensor in self._tensors("gradients", step):
            mean = _mean_abs(tensor, step)
            if mean is None:  # reductions without the mean absolute value
                continue
            self.evaluated = True
            if mean < self.threshold:
                self.message = f"{name}: mean |gradient| {mean:.2e} < {self.threshold:g}"
                return True
        return False


class ExplodingTensor(_TensorRule):
    """A tensor with NaN or infinite values (default only_nan=False), in the collections this
    image records; for a tensor saved as reductions, a NaN or infinite reduction (`_finite`)."""

    collections = ("losses", "gradients", "weights", "biases")

    def invoke_at_step(self, step: int) -> bool:
        for collection in self.collections:
            for name, tensor in self._tensors(collection, step):
                finite = _finite(tensor, step)
                if finite is None:
                    continue
                self.evaluated = True
                if not finite:
                    self.message = f"{name}: NaN or infinite values"
                    return True
        return False


class LossNotDecreasing(_TensorRule):
    """The loss, checked at least `num_steps` (10) steps after the previous check, is not lower
    by `diff_percent` percent (default: not lower at all). The built-in prefers EVAL losses when
    `mode` is not given; here TRAIN, since each validation pass repeats the same images and its
    steps compare different batches of one pass, not progress."""

    num_steps = 10
    diff_percent = 0.0
    mode = modes.TRAIN

    def __init__(self, trial: Any) -> None:
        super().__init__(trial)
        self._last: tuple[int, float] | None = None  # mode step and loss at the last check

    def invoke_at_step(self, step: int) -> bool:
        if self.base_trial.mode(step) != self.mode:
            return False
        mode_step = self.base_trial.mode_step(step)
        losses = self._losses(step)
        if not losses:
            return False
        loss = float(np.mean(losses))
        if self._last is None:
            self._last = (mode_step, loss)
            return False
        before_step, before = self._last
        if mode_step - before_step < self.num_steps:
            return False
        self.evaluated = True
        self._last = (mode_step, loss)
        if not loss < before * (1 - self.diff_percent / 100):
            self.message = (
                f"{self.mode.name} loss {before:.4f} at step {before_step} -> {loss:.4f} at step "
                f"{mode_step}: not lower"
                + (f" by {self.diff_percent}%" if self.diff_percent else "")
            )
            return True
        return False


class Overfit(_TensorRule):
    """After each validation pass: (mean EVAL loss - mean TRAIN loss of the epoch before it) /
    mean TRAIN loss above `ratio_threshold` (0.1). `patience` (1) is "the number of steps for
    which the ratio_threshold is allowed to exceed": it fires on the next one in a row."""

    ratio_threshold = 0.1
    patience = 1

    def __init__(self, trial: Any) -> None:
        super().__init__(trial)
        self._train: list[float] = []
        self._eval: list[float] = []
        self._exceeded = 0

    def invoke_at_step(self, step: int) -> bool:
        mode = self.base_trial.mode(step)
        losses = self._losses(step)
        if mode == modes.TRAIN:
            if self._eval:  # a new epoch: the last one's train losses are done with
                self._train, self._eval = [], []
            self._train.extend(losses)
        elif mode == modes.EVAL:
            self._eval.extend(losses)
        if mode != modes.EVAL or not self._train or not self._eval or not self._pass_ends(step):
            return False
        self.evaluated = True
        train = float(np.mean(self._train))
        val = float(np.mean(self._eval))
        ratio = (val - train) / train if train else math.inf
        self._exceeded = self._exceeded + 1 if ratio > self.ratio_threshold else 0
        if self._exceeded > self.patience:
            self.message = (
                f"validation loss {val:.4f} vs training loss {train:.4f}: "
                f"ratio {ratio:.2f} > {self.ratio_threshold}"
            )
            return True
        return False

    def _pass_ends(self, step: int) -> bool:
        after = bisect.bisect_right(self.steps, step)
        return after == len(self.steps) or self.base_trial.mode(self.steps[after]) != modes.EVAL


RULES: dict[str, type[_TensorRule]] = {
    "loss_not_decreasing": LossNotDecreasing,
    "vanishing_gradient": VanishingGradient,
    "exploding_tensor": ExplodingTensor,
    "overfit": Overfit,
}
"""The built-ins restated here, by the names of the SDK's rule_configs (and of the job's own
verdicts in evaluation.json)."""


def evaluate(trial: Any) -> list[TensorVerdict]:
    """Every rule of RULES over every saved step of an smdebug trial (smdebug.trials.create_trial),
    until it holds; one verdict each."""
    chatter = logging.getLogger("smdebug")  # invoke_rule logs two INFO lines per rule and step
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        return [_evaluate(name, make(trial)) for name, make in RULES.items()]
    finally:
        chatter.setLevel(level)


def _evaluate(name: str, rule: _TensorRule) -> TensorVerdict:
    fired: int | None = None
    for step in rule.steps:  # the saved steps only: invoke_rule waits for a step it cannot find
        try:
            invoke_rule(rule, start_step=step, end_step=step + 1, raise_eval_cond=True)
        except RuleEvaluationConditionMet as met:
            fired = int(met.step)
            break
    if fired is not None:
        return TensorVerdict(name, "issues_found", fired, rule.message)
    if rule.evaluated:
        return TensorVerdict(name, "ok", None, "no issues found")
    return TensorVerdict(name, "not_evaluated", None, "no tensors it reads")
