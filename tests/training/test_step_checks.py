"""The checks between training steps: a stop and a NaN loss, read every `interval` steps, in one
process and agreed by two over gloo (the job's own process launcher, `distributed.run`)."""

from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from container.training import distributed
from container.training.distributed import Rank, World
from container.training.hardware import Hardware
from container.training.loop import train_one_epoch
from container.training.profiler import Profiler
from container.training.rule_recorder import RuleRecorder
from container.training.step_checks import (
    GPU_CHECK_STEPS,
    NonFiniteLossError,
    StepChecks,
    check_interval,
)
from tests.conftest import free_port

ONE = Rank(rank=0, local_rank=0, world_size=1, local_world_size=1)
CPU = torch.device("cpu")


def _recorder() -> RuleRecorder:
    """Rank 0's recorder, on a model without gradients (only the losses matter here)."""
    return RuleRecorder(nn.Linear(2, 2), first_step=1, interval=1000)


def test_the_interval_is_every_step_on_the_cpu_and_fewer_on_a_gpu() -> None:
    assert check_interval("auto", CPU) == 1
    assert check_interval("auto", torch.device("cuda", 0)) == GPU_CHECK_STEPS
    assert check_interval(7, torch.device("cuda", 0)) == check_interval(7, CPU) == 7
    with pytest.raises(ValueError, match="interval=0"):
        StepChecks(rank=ONE, device=CPU, first_step=0, interval=0, stop=lambda: False)


def test_a_single_process_stops_at_the_step_its_signal_arrives() -> None:
    """No one to agree with: the flag is read after every step, and the losses so far recorded."""
    stop = threading.Event()
    recorder = _recorder()
    checks = StepChecks(
        rank=ONE, device=CPU, first_step=10, interval=4, stop=stop.is_set, recorder=recorder
    )
    assert not checks.after_step(torch.tensor(1.0))
    stop.set()
    assert checks.after_step(torch.tensor(0.5))
    assert recorder.losses == [(10, 1.0), (11, 0.5)]


def test_a_nan_loss_fails_at_the_next_check_naming_its_step() -> None:
    recorder = _recorder()
    checks = StepChecks(
        rank=ONE, device=CPU, first_step=0, interval=4, stop=lambda: False, recorder=recorder
    )
    losses = [1.0, 0.9, 0.8, 0.7, 0.6, math.nan, 0.5, 0.4]
    for loss in losses[:7]:
        assert not checks.after_step(torch.tensor(loss))
    assert len(recorder.losses) == 4  # steps 0-3, read at the check after step 3
    with pytest.raises(NonFiniteLossError) as caught:
        checks.after_step(torch.tensor(losses[7]))
    assert (caught.value.step, caught.value.last_step) == (5, 7)
    assert caught.value.loss is not None
    assert math.isnan(caught.value.loss)
    # Up to the step that broke (its NaN left out); none of the steps after it.
    assert recorder.losses == [(s, pytest.approx(v)) for s, v in enumerate(losses[:5])]


def test_the_steps_after_the_last_check_are_checked_when_the_epoch_ends() -> None:
    checks = StepChecks(rank=ONE, device=CPU, first_step=0, interval=4, stop=lambda: False)
    assert not checks.finish()  # nothing pending: nothing to read
    checks.after_step(torch.tensor(1.0))
    checks.after_step(torch.tensor(math.inf))
    with pytest.raises(NonFiniteLossError) as caught:
        checks.finish()
    assert (caught.value.step, caught.value.loss, caught.value.last_step) == (1, math.inf, 1)


def test_gradients_are_recorded_at_their_step_though_losses_come_later() -> None:
    """The recorder reads a step's gradients right after it, not at the check."""
    model = nn.Linear(2, 1, bias=False)
    recorder = RuleRecorder(model, first_step=1, interval=2)
    checks = StepChecks(
        rank=ONE, device=CPU, first_step=0, interval=3, stop=lambda: False, recorder=recorder
    )
    for step in range(3):
        model.zero_grad()
        (model(torch.ones(1, 2)) * (step + 1)).sum().backward()  # gradient (step + 1, step + 1)
        checks.after_step(torch.tensor(1.0))
    assert [(r.step, r.l2["weight"]) for r in recorder.gradients] == [
        (0, pytest.approx(math.sqrt(2))),
        (2, pytest.approx(3 * math.sqrt(2))),
    ]
    assert [s for s, _ in recorder.losses] == [0, 1, 2]


# --- two processes ------------------------------------------------------------------------------

INTERVAL = 4


def _batches(count: int, on_yield: dict[int, str], stop: threading.Event) -> Iterator[Any]:
    """`count` batches of a 2-feature problem; at the steps in `on_yield`, a NaN batch ("nan") or
    a stop signal arriving while the step runs ("stop")."""
    for i in range(count):
        inputs, labels = torch.ones(4, 2), torch.tensor([0, 1, 0, 1])
        if on_yield.get(i) == "nan":
            inputs = inputs * math.nan
        elif on_yield.get(i) == "stop":
            stop.set()
        yield inputs, labels


def _epoch(
    rank: Rank,
    first_step: int,
    batches: Iterator[Any],
    stop: threading.Event,
    recorder: RuleRecorder | None,
) -> dict[str, Any]:
    """One `train_one_epoch` on a tiny model; what it returned, or the divergence it raised."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checks = StepChecks(
        rank=rank,
        device=CPU,
        first_step=first_step,
        interval=INTERVAL,
        stop=stop.is_set,
        recorder=recorder,
    )
    try:
        stats = train_one_epoch(
            model,
            batches,
            lambda x: x,
            criterion=nn.CrossEntropyLoss(),
            optimizer=optimizer,
            scheduler=LambdaLR(optimizer, lambda _: 1.0),
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            hw=Hardware(device=CPU, amp_dtype=None, grad_scaler=False, threads=1, workers=0),
            profiler=Profiler(CPU),
            checks=checks,
        )
    except NonFiniteLossError as exc:
        return {"diverged": [exc.step, None if exc.loss is None else str(exc.loss)]}
    return {"steps": stats.steps, "stopped": stats.stopped}


def _rank_main(world: World, out: Path, local_rank: int) -> int:
    """Each process: a stop that reaches rank 1 only, mid-interval; then, resumed from there, a NaN
    loss on rank 1 in the steps after the epoch's last check."""
    torch.set_num_threads(1)
    rank = world.rank(local_rank)
    distributed.join(world, rank)
    try:
        recorder = _recorder() if rank.is_main else None
        stop = threading.Event()
        plan = {5: "stop"} if rank.rank == 1 else {}
        stopped = _epoch(rank, 0, _batches(10, plan, stop), stop, recorder)
        resumed_at = stopped.get("steps", 0)  # state.step after the stop
        stop = threading.Event()  # a new process, after the restart
        plan = {4: "nan"} if rank.rank == 1 else {}
        diverged = _epoch(rank, resumed_at, _batches(6, plan, stop), stop, recorder)
        losses = [s for s, _ in recorder.losses] if recorder is not None else None
        result = {"stopped": stopped, "diverged": diverged, "recorded": losses}
        (out / f"rank{rank.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.leave()
    return 0


@pytest.mark.timeout(180)
def test_two_processes_stop_and_diverge_at_the_same_step(tmp_path: Path) -> None:
    world = World(
        hosts=("localhost",),
        host_rank=0,
        processes_per_host=2,
        master_addr="127.0.0.1",
        master_port=free_port(),
        backend="gloo",
    )
    assert distributed.run(world, functools.partial(_rank_main, world, tmp_path)) == 0
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    # SIGTERM reached rank 1 during step 5: both ran on to the interval's check, after step 7, so
    # both save state.step = 8 and resume there.
    assert [r["stopped"] for r in ranks] == [{"steps": 8, "stopped": True}] * 2
    # Resumed at step 8, 6 steps left: checked after step 11, then at the epoch's end, where rank
    # 1's NaN at step 12 fails both; rank 0 names the other process's loss.
    assert [r["diverged"] for r in ranks] == [{"diverged": [12, None]}, {"diverged": [12, "nan"]}]
    # Rank 0's recorder: steps 0-7, then 8-12 (its own loss at step 12 was finite).
    assert ranks[0]["recorded"] == list(range(8)) + list(range(8, 13))
