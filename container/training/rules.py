"""SageMaker Debugger's built-in rules, evaluated by the training job itself, and the NaN stop.

Why: Debugger is closed to new customers ("we have made the decision to close new customer access
to Amazon SageMaker Debugger, effective 7/30/26",
https://docs.aws.amazon.com/sagemaker/latest/dg/debugger-availability-change.html), so on a new
account its built-in rules never run. What they check is cheap given what the job has anyway: the
loss of every step, the validation loss of every epoch, per-layer gradient norms every few steps and
statistics of the first forward pass. So the job evaluates them itself, always (with or without
debughookconfig.json, whether smdebug works or not), on rank 0, and writes the verdicts to
evaluation.json; a rule that fires logs one WARNING line when it does.

Where the rules come from. smdebug's rule interface is smdebug/rules/rule.py (in the installed
package and in awslabs/sagemaker-debugger): `invoke_at_step(step)` returns True once the condition
is met and the service then ends that rule with IssuesFound; a rule that never fires ends with
NoIssuesFound. The built-in rule classes are not published: smdebug's wheels, 0.4.13 to 1.0.34, ship
only that interface (smdebug/rules/{rule,rule_invoker,req_tensors}.py); the rules run in the
Debugger rule-evaluator image. Each function below follows its rule's documented behaviour and
default parameters: "List of Debugger built-in rules"
(https://docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html; the same text in
awsdocs/amazon-sagemaker-developer-guide doc_source/debugger-built-in-rules.md) and smdebug's own
docs/rules/FirstPartyRules.md in awslabs/sagemaker-debugger. smdebug_rulesconfig's
debugger_rules/rule_config_jsons/ruleConfigs.json names the collection each rule reads. Where that
input is something this job does not record, the function's docstring says how it adapts.

Verdicts: "issues_found" with the global step (0-based, as smdebug counts) where the rule first
fired; "ok" when the rule was evaluated on the run's data and did not fire, which is what the
service reports as NoIssuesFound when a job ends first (a 3-epoch run cannot stall for 5 epochs);
"not_evaluated" when there was not one comparison to make (fewer than two spans of steps or two
epochs, no gradients, a resumed run for the initial-weights rule).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypedDict

__all__ = [
    "EpochLosses",
    "GradientRecord",
    "StartRecord",
    "Verdict",
    "exploding_tensor",
    "loss_not_decreasing",
    "loss_points",
    "overfit",
    "overtraining",
    "poor_weight_initialization",
    "vanishing_gradient",
]

Status = Literal["ok", "issues_found", "not_evaluated"]


class Verdict(TypedDict):
    """One rule's verdict, as evaluation.json's `rules` lists it."""

    name: str
    status: Status
    step: int | None
    message: str


@dataclass(frozen=True)
class EpochLosses:
    """An epoch's mean training loss and its validation loss, at the global step that ended it."""

    epoch: int
    step: int
    train: float
    valid: float


@dataclass(frozen=True)
class GradientRecord:
    """Per-layer gradient statistics at one step, for the parameters that had a gradient."""

    step: int
    l2: Mapping[str, float]
    mean_abs: Mapping[str, float]


@dataclass
class StartRecord:
    """What the first steps of a run from step 0 showed about its starting weights."""

    relu_input_variance: dict[str, float] = field(default_factory=dict)
    """Variance of every ReLU's input in the first forward pass, in call order."""
    gradient_spread: list[tuple[int, float]] = field(default_factory=list)
    """(step, 95th minus 5th percentile of all trainable gradient values) for the first steps."""
    weight_std: dict[str, float] = field(default_factory=dict)
    """Standard deviation of each weight tensor before the first step."""


def _found(name: str, step: int, message: str) -> Verdict:
    return {"name": name, "status": "issues_found", "step": step, "message": message}


def _ok(name: str, message: str) -> Verdict:
    return {"name": name, "status": "ok", "step": None, "message": message}


def _not_evaluated(name: str, message: str) -> Verdict:
    return {"name": name, "status": "not_evaluated", "step": None, "message": message}


def _listed(names: Sequence[str], limit: int = 3) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


# --- the rules: pure functions of recorded values -----------------------------------------------


def loss_points(
    losses: Sequence[tuple[int, float]], num_steps: int = 10
) -> list[tuple[int, float]]:
    """What loss_not_decreasing compares: (step, loss) of the first step, then (last step, mean
    loss) of each following span of `num_steps` steps."""
    points = [losses[0]] if losses else []
    for end in range(1 + num_steps, len(losses) + 1, num_steps):
        span = losses[end - num_steps : end]
        points.append((span[-1][0], sum(value for _, value in span) / num_steps))
    return points


def loss_not_decreasing(
    losses: Sequence[tuple[int, float]], *, num_steps: int = 10, diff_percent: float = 0.0
) -> Verdict:
    """LossNotDecreasing: the training loss did not go down over `num_steps` steps.

    Defaults num_steps=10, diff_percent=0.0 (built-in rules list, "LossNotDecreasing";
    FirstPartyRules.md); it reads the losses collection (ruleConfigs.json "LossNotDecreasing").
    Every `num_steps` steps the rule compares the loss with the loss
    `num_steps` steps earlier and fires when it is not lower by `diff_percent` percent. Adapted: the
    loss compared at a step is the mean of the `num_steps` training losses since the previous
    comparison (every loss counts once; smdebug reads one saved batch's loss, which is noisier),
    and at the first step, which has no earlier ones, that step's loss: so a loss that jumps at
    once (a learning rate far too high) fires at the first comparison. It reads TRAIN losses: the
    rule's default mode tries EVAL losses first, but this job's validation loss is one value per
    epoch, which overfit and overtraining judge.
    """
    name = "loss_not_decreasing"
    if len(losses) <= num_steps:
        return _not_evaluated(
            name,
            f"Needs more than {num_steps} training steps for one comparison; the run recorded "
            f"{len(losses)}.",
        )
    points = loss_points(losses, num_steps)
    for (_, before), (step, now) in itertools.pairwise(points):
        if now >= before * (1 - diff_percent / 100):
            return _found(
                name,
                step,
                f"The training loss stopped decreasing: over the {num_steps} steps to step "
                f"{step} it averaged {now:.4g}, against {before:.4g} {num_steps} steps earlier. "
                "Early in a run this means the learning rate is too high (or far too low): try "
                "a lower lr or a longer warmup_epochs, and check that the labels match the "
                "images. Late in a run it means training has converged: more epochs will not "
                "help.",
            )
    return _ok(
        name,
        f"The training loss went down over every {num_steps} steps ({points[0][1]:.4g} at step "
        f"{points[0][0]}, {points[-1][1]:.4g} over the {num_steps} steps to {points[-1][0]}).",
    )


def overfit(
    epochs: Sequence[EpochLosses],
    *,
    start_step: int = 0,
    patience: int = 1,
    ratio_threshold: float = 0.1,
) -> Verdict:
    """Overfit: the validation loss exceeds the training loss by more than `ratio_threshold` of it.

    Defaults start_step=0, patience=1, ratio_threshold=0.1 (built-in rules list, "Overfit"): the
    ratio is (mean validation loss - mean training loss) / mean training loss. Adapted: one
    comparison per epoch, its mean training loss against its validation loss (the service compares
    the means of the TRAIN and EVAL losses it saved). `patience` is the doc's "number of steps for
    which the ratio_threshold is allowed to exceed": the rule fires on the (patience + 1)-th
    exceedance in a row, so the first epoch of a run from scratch, whose BatchNorm statistics have
    not settled, cannot fire it alone.
    """
    name = "overfit"
    judged = [e for e in epochs if e.step >= start_step]
    if not judged:
        return _not_evaluated(name, "No epoch with a validation loss was completed.")
    streak = 0
    for e in judged:
        ratio = (e.valid - e.train) / e.train if e.train > 0 else 0.0
        streak = streak + 1 if ratio > ratio_threshold else 0
        if streak > patience:
            return _found(
                name,
                e.step,
                f"The model overfits: in epoch {e.epoch} the validation loss ({e.valid:.4g}) was "
                f"{ratio:.0%} above the training loss ({e.train:.4g}), more than "
                f"{ratio_threshold:.0%} above for {streak} epochs in a row. Use more training "
                "data or augment=true, more weight_decay or label_smoothing, fewer epochs, or "
                "freeze the backbone longer (frozen_epochs).",
            )
    worst = max((e.valid - e.train) / e.train if e.train > 0 else 0.0 for e in judged)
    return _ok(
        name,
        f"In {len(judged)} epoch(s) the validation loss was more than {ratio_threshold:.0%} "
        f"above the training loss in at most {patience} epoch(s) in a row (largest gap "
        f"{worst:.0%}).",
    )


def _stalled(values: Sequence[tuple[int, float]], patience: int, delta: float) -> int | None:
    """Index of the first value at which `patience` values in a row did not beat the best so
    far by more than `delta`, or None."""
    best, waited = math.inf, 0
    for i, (_, value) in enumerate(values):
        if best - value > delta:
            best, waited = value, 0
        else:
            waited += 1
            if waited >= patience:
                return i
    return None


def overtraining(
    epochs: Sequence[EpochLosses],
    *,
    patience_train: int = 5,
    patience_validation: int = 10,
    delta: float = 0.1,
) -> Verdict:
    """Overtraining: the training or the validation loss stopped improving.

    Defaults patience_train=5, patience_validation=10, delta=0.1 (built-in rules list,
    "Overtraining"): a loss improves when it beats its best so far by more than `delta`; the rule
    fires when the training loss has not improved for `patience_train` evaluations or the
    validation loss for `patience_validation`. Adapted: both are counted in epochs, where the
    service counts saved steps (every 500 by default): the validation loss exists once per epoch
    here, and the epoch's mean training loss is the comparable training value.
    """
    name = "overtraining"
    if len(epochs) < 2:
        return _not_evaluated(name, "Needs two epochs to see whether the losses improve.")
    stalls = []
    for label, patience, values in (
        ("training", patience_train, [(e.epoch, e.train) for e in epochs]),
        ("validation", patience_validation, [(e.epoch, e.valid) for e in epochs]),
    ):
        at = _stalled(values, patience, delta)
        if at is not None:
            stalls.append((at, label, patience))
    if not stalls:
        return _ok(
            name,
            f"In {len(epochs)} epochs neither the training loss went {patience_train} epochs "
            f"nor the validation loss {patience_validation} without improving by more than "
            f"{delta:g}.",
        )
    at, label, patience = min(stalls)
    e = epochs[at]
    return _found(
        name,
        e.step,
        f"The {label} loss has not improved by more than {delta:g} for {patience} epochs (up to "
        f"epoch {e.epoch}): further epochs only fit the training set harder. Train for fewer "
        "epochs (the job ships the best epoch's model either way), or give it more data or "
        "augmentation if the model should keep learning.",
    )


def vanishing_gradient(records: Sequence[GradientRecord], *, threshold: float = 1e-7) -> Verdict:
    """VanishingGradient: a layer's mean absolute gradient fell below `threshold`.

    Default threshold=1e-7 (built-in rules list, "VanishingGradient"; FirstPartyRules.md:
    "Gradients whose mean of absolute values are lower than this threshold"); it reads the
    gradients collection (ruleConfigs.json "VanishingGradient"), which this job samples at the
    hook's save_interval (`gradient_interval`). Only trainable parameters have gradients, so a
    frozen backbone's layers are not judged.
    """
    name = "vanishing_gradient"
    if not any(r.mean_abs for r in records):
        return _not_evaluated(name, "No gradients were recorded.")
    for r in records:
        small = [k for k, v in r.mean_abs.items() if math.isfinite(v) and v < threshold]
        if small:
            return _found(
                name,
                r.step,
                f"Gradients vanished at step {r.step}: the mean absolute gradient of "
                f"{_listed(small)} was below {threshold:g} (smallest "
                f"{min(r.mean_abs[k] for k in small):.3g}), so those layers barely learn. Check "
                "the starting weights (a BatchNorm scale near zero, a badly scaled pretrained "
                "file) or train from ImageNet weights (pretrained=true).",
            )
    return _ok(
        name,
        f"Every trainable layer's mean absolute gradient stayed above {threshold:g} "
        f"({len(records)} records).",
    )


def exploding_tensor(records: Sequence[GradientRecord], *, only_nan: bool = False) -> Verdict:
    """ExplodingTensor on the gradients collection: a gradient holds NaN or infinite values.

    Default only_nan=False: NaN and infinity both count (built-in rules list, "ExplodingTensor";
    FirstPartyRules.md); its config (ruleConfigs.json "ExplodingTensor") names no collection, so
    the service checks every saved tensor; here the gradients, where an explosion shows first.
    Adapted: judged from each layer's gradient norms, which are non-finite exactly when the tensor
    holds a non-finite value (or values so large that their norm overflows: exploding either way).
    Gradients are also recorded when a non-finite loss stops the job, at the last step run (the
    loss is checked every `check_steps`: on CPU, that step).
    """
    name = "exploding_tensor"
    if not any(r.l2 for r in records):
        return _not_evaluated(name, "No gradients were recorded.")
    for r in records:
        bad = [
            k
            for k, v in {**r.l2, **r.mean_abs}.items()
            if (math.isnan(v) if only_nan else not math.isfinite(v))
        ]
        if bad:
            return _found(
                name,
                r.step,
                f"Gradients exploded at step {r.step}: {_listed(sorted(set(bad)))} held NaN or "
                "infinite values. Lower lr, use a longer warmup_epochs, set mixed_precision=off, "
                "and check the training data for corrupt images.",
            )
    largest = max(v for r in records for v in r.l2.values())
    return _ok(name, f"No gradient held NaN or infinite values (largest layer norm {largest:.3g}).")


def poor_weight_initialization(
    start: StartRecord | None,
    *,
    threshold: float = 10.0,
    distribution_range: float = 0.001,
    steps: int = 10,
) -> Verdict:
    """PoorWeightInitialization: activations of very different scales across layers, or gradients
    with almost no spread, in the first steps.

    Defaults activation_inputs_regex=".*relu_input", threshold=10.0, distribution_range=0.001,
    patience=5, steps=10 (built-in rules list, "PoorWeightInitialization"); it reads the relu_input
    collection (ruleConfigs.json "PoorWeightInitialization", include_regex ".*relu_input"). It
    fires when the ratio of the largest to the smallest variance of the ReLU inputs across layers
    exceeds `threshold`, or when the 95th minus the 5th percentile of the gradients is below
    `distribution_range`, within the first `steps` steps. Adapted: the ReLU inputs are those of the
    first forward pass (hooks removed after it); the gradient percentiles are over a value-weighted
    sample of all trainable gradients at each of the first `steps` steps, and the rule fires when
    every one of those steps is that narrow: the doc does not say over what its "minimum" is taken,
    and one narrow step among them reflects how training went (a converging head, a memorised
    batch), not the starting weights, which shape all of them. The rule's third check, the loss not
    decreasing for `patience` of the first steps, is not made: this job warms the learning rate up
    from lr/100 (warmup_epochs), so a flat loss in the first 10 steps is expected and says nothing
    about the weights; loss_not_decreasing judges the loss.
    """
    name = "poor_weight_initialization"
    if start is None:
        return _not_evaluated(
            name, "The run resumed from a checkpoint: its starting weights were not seen."
        )
    variances = {k: v for k, v in start.relu_input_variance.items() if math.isfinite(v)}
    spreads = [(s, v) for s, v in start.gradient_spread if s < steps and math.isfinite(v)]
    if len(variances) < 2 and not spreads:
        return _not_evaluated(name, "No activations or gradients of the first steps were seen.")
    if len(variances) >= 2:
        low = min(variances, key=lambda k: variances[k])
        high = max(variances, key=lambda k: variances[k])
        ratio = variances[high] / variances[low] if variances[low] > 0 else math.inf
        if ratio > threshold:
            return _found(
                name,
                0,
                f"Poorly initialised weights: in the first forward pass the ReLU input variance "
                f"ranged from {variances[low]:.3g} ({low}) to {variances[high]:.3g} ({high}), "
                f"{ratio:.3g} times, more than {threshold:g}. Check the starting weights (a "
                "pretrained file with badly scaled layers or BatchNorm statistics from another "
                "model), or start from ImageNet weights (pretrained=true).",
            )
    else:
        ratio = math.nan
    if spreads:
        widest = max(spread for _, spread in spreads)
        if widest < distribution_range:
            return _found(
                name,
                spreads[-1][0],
                f"Poorly initialised weights: in each of the first {len(spreads)} steps 90% of the "
                f"gradient values lay within {widest:.3g} or less, under {distribution_range:g}: "
                "every layer gets almost the same, tiny update. Check the starting weights, or "
                "start from ImageNet weights (pretrained=true).",
            )
    return _ok(
        name,
        f"ReLU input variances in the first forward pass were within {ratio:.3g} times of each "
        f"other; the gradients of the first {steps} steps were spread out.",
    )
