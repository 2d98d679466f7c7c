"""Debugger's built-in rules, run by `launch report` with smdebug's rule API, on tensors that the
image's hook (container/training/debugger.py) records from a tiny model: a healthy run where none
fires, and a sick one built to trip each rule at a known step; each both as the service's hook
saves them (full tensors) and as `save_tensors` does (gradients as reductions only)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from smdebug import modes
from smdebug.exceptions import TensorUnavailableForStep
from smdebug.trials import create_trial
from torch import nn

from container.training.debugger import create_hook
from launch.report import analyse_debug_output
from launch.tensor_rules import RULES, TensorVerdict

TRAIN_STEPS, EVAL_STEPS, EPOCHS = 12, 3, 3
"""Global steps: TRAIN 0-11, EVAL 12-14, TRAIN 15-26, EVAL 27-29, TRAIN 30-41, EVAL 42-44."""

FULL = [{"CollectionName": name} for name in ("losses", "gradients", "weights")]
"""Full tensors, as the service's hook saves them for `launch train`."""

OWN = None
"""The job's own hook (`save_tensors`): losses, and gradients as reductions; with 36 TRAIN steps
it saves every step (`own_save_interval`)."""


def _poison(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.register_hook(lambda grad: grad * float("nan"))


def _record(
    folder: Path,
    lr: float,
    dead: bool,
    val_shift: float,
    nan_at: int | None,
    collections: list[dict[str, Any]] | None = OWN,
    nan_gradient_at: int | None = None,
) -> str:
    """Train a 4-8-1 MLP on one fixed batch with the hook saving `collections` at every step
    (a debughookconfig.json), or with the job's own hook. NaN inputs at step `nan_at`; at
    `nan_gradient_at`, a finite loss whose gradient turns NaN below the ReLU."""
    folder.mkdir(exist_ok=True)
    tensors = folder / "tensors"
    config = folder / "debughookconfig.json"
    if collections is not None:
        config.write_text(
            json.dumps(
                {
                    "LocalPath": str(tensors),
                    "HookParameters": {"save_interval": "1"},
                    "CollectionConfigurations": collections,
                }
            )
        )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    if dead:  # every ReLU off: no gradient reaches the first layer
        nn.init.constant_(model[0].bias, -100.0)
    criterion = nn.MSELoss()
    hook = create_hook(config, model, criterion, tensors, train_steps=TRAIN_STEPS * EPOCHS)
    assert hook is not None
    assert hook.active
    x = torch.randn(16, 4)
    y = x.sum(dim=1, keepdim=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    step = 0
    for _ in range(EPOCHS):
        hook.set_mode(training=True)
        for _ in range(TRAIN_STEPS):
            optimizer.zero_grad()
            inputs = x * float("nan") if step == nan_at else x
            poison = model[0].register_forward_hook(_poison) if step == nan_gradient_at else None
            criterion(model(inputs), y).backward()
            if poison is not None:
                poison.remove()
            optimizer.step()
            step += 1
        hook.set_mode(training=False)
        with torch.no_grad():
            for _ in range(EVAL_STEPS):
                criterion(model(x), y + val_shift)
                step += 1
    hook.close()
    return str(tensors)


def _verdicts(path: str) -> dict[str, TensorVerdict]:
    analysis = analyse_debug_output(path)
    assert [v.name for v in analysis.rules] == list(RULES)
    return {v.name: v for v in analysis.rules}


RECORDINGS = pytest.mark.parametrize("collections", [FULL, OWN], ids=["full", "reductions"])


@RECORDINGS
def test_a_healthy_run_trips_no_rule(tmp_path: Path, collections: list[dict[str, Any]]) -> None:
    path = _record(
        tmp_path, lr=0.02, dead=False, val_shift=0.0, nan_at=None, collections=collections
    )
    verdicts = _verdicts(path)
    assert {name: v.status for name, v in verdicts.items()} == dict.fromkeys(RULES, "ok")


@RECORDINGS
def test_each_rule_fires_at_the_step_that_trips_it(
    tmp_path: Path, collections: list[dict[str, Any]]
) -> None:
    """lr=0: a flat loss; dead ReLUs: zero gradients; validation on shifted targets: a validation
    loss far above the training loss; NaN inputs at global step 35 (the third epoch, after
    overfit's two): NaN loss and gradients."""
    path = _record(tmp_path, lr=0.0, dead=True, val_shift=3.0, nan_at=35, collections=collections)
    verdicts = _verdicts(path)
    fired = {name: (v.status, v.step) for name, v in verdicts.items()}
    assert fired == {
        "loss_not_decreasing": ("issues_found", 10),  # TRAIN step 10 vs step 0, 10 steps on
        "vanishing_gradient": ("issues_found", 0),
        "exploding_tensor": ("issues_found", 35),
        "overfit": ("issues_found", 29),  # the second validation pass in a row (patience 1)
    }
    assert verdicts["loss_not_decreasing"].message.endswith("at step 10: not lower")
    assert verdicts["vanishing_gradient"].message.startswith("gradient/Sequential_0.")
    assert "NaN or infinite" in verdicts["exploding_tensor"].message
    assert "ratio" in verdicts["overfit"].message


def test_reductions_read_as_the_full_tensors_do(tmp_path: Path) -> None:
    """The same run recorded both ways: the own hook's gradients are reductions only (`value`
    raises), and the report's gradient norms and losses, read from them, are the full tensors'."""
    full = analyse_debug_output(
        _record(
            tmp_path / "full", lr=0.02, dead=False, val_shift=0.0, nan_at=None, collections=FULL
        )
    )
    own_path = _record(tmp_path / "own", lr=0.02, dead=False, val_shift=0.0, nan_at=None)
    own = analyse_debug_output(own_path)
    gradient = create_trial(own_path).tensor("gradient/Sequential_0.weight")
    with pytest.raises(TensorUnavailableForStep):
        gradient.value(0, mode=modes.TRAIN)
    assert gradient.reduction_value(0, "max", mode=modes.TRAIN, abs=True) > 0
    assert (
        set(own.gradient_norms)
        == set(full.gradient_norms)
        == {f"Sequential_{layer}.{kind}" for layer in (0, 2) for kind in ("weight", "bias")}
    )
    for layer, norms in full.gradient_norms.items():
        assert len(norms) == TRAIN_STEPS * EPOCHS
        assert own.gradient_norms[layer] == pytest.approx(norms, rel=1e-5)
    assert own.losses == full.losses
    assert own.rules == full.rules


def test_a_nan_gradient_shows_in_its_reductions(tmp_path: Path) -> None:
    """Gradients saved only as reductions (and the losses, which smdebug's PyTorch hook always
    saves): a NaN gradient under a finite loss at step 35, which ExplodingTensor finds in the
    first layer's reductions."""
    gradients = {
        "CollectionName": "gradients",
        "CollectionParameters": {"reductions": "l2_norm,abs_mean,abs_max"},
    }
    path = _record(
        tmp_path,
        lr=0.02,
        dead=False,
        val_shift=0.0,
        nan_at=None,
        collections=[gradients],
        nan_gradient_at=35,
    )
    verdicts = _verdicts(path)
    exploding = verdicts["exploding_tensor"]
    assert (exploding.status, exploding.step) == ("issues_found", 35)
    assert exploding.message.startswith("gradient/Sequential_0.")
    trial = create_trial(path)
    assert math.isfinite(float(trial.tensor("MSELoss_output_0").value(35)))


def test_a_rule_without_its_tensors_is_not_evaluated(tmp_path: Path) -> None:
    losses = [{"CollectionName": "losses"}]
    path = _record(tmp_path, lr=0.02, dead=False, val_shift=0.0, nan_at=None, collections=losses)
    verdicts = _verdicts(path)
    assert verdicts["vanishing_gradient"] == TensorVerdict(
        "vanishing_gradient", "not_evaluated", None, "no tensors it reads"
    )
    assert verdicts["loss_not_decreasing"].status == "ok"
