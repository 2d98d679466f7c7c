"""Between training steps: a stop request and a NaN or infinite loss, agreed by every process.

Reading a step's loss on the host waits for the GPU to finish everything queued before it, and
agreeing between processes is an all-reduce: doing both after every step keeps the host from
queueing the next step while the GPU works. So the losses stay on the device and are read (one
wait), given to the rule recorder and checked every `interval` steps, and after an epoch's last
step. Every process checks at the same steps, so all stop at the same one; a NaN or infinite loss
fails the job at the next check at the latest, naming the first step whose loss it was. A single
process has nothing to agree on: it reads its stop flag after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from container.training import distributed
from container.training.distributed import Rank
from container.training.rule_recorder import RuleRecorder

__all__ = ["GPU_CHECK_STEPS", "NonFiniteLossError", "StepChecks", "check_interval"]

GPU_CHECK_STEPS = 20
"""`check_steps=auto` on a GPU: one wait for the GPU per 20 steps, and a stop at most 19 steps late,
which must fit in the 120 s SageMaker leaves between SIGTERM and SIGKILL with the checkpoint."""


def check_interval(check_steps: int | Literal["auto"], device: torch.device) -> int:
    """Steps between checks: as asked, else every step on the CPU (where reading the loss costs
    nothing and a step is long) and every `GPU_CHECK_STEPS` on a GPU."""
    if check_steps != "auto":
        return check_steps
    return GPU_CHECK_STEPS if device.type == "cuda" else 1


class NonFiniteLossError(Exception):
    """Raised by `StepChecks` when a process's training loss became NaN or infinite; the epoch's
    runner turns it into the job's DivergenceError. Identical on every process but `loss`."""

    def __init__(self, step: int, loss: float | None, last_step: int) -> None:
        super().__init__(step, loss, last_step)
        self.step = step  # the first step whose loss was NaN or infinite on any process
        self.loss = loss  # this process's loss at that step; None where it was finite here
        self.last_step = last_step  # the step the model's weights and gradients come from


class StepChecks:
    """What the training loop calls after each step (`after_step`) and after its last (`finish`).

    `first_step` is the number of the next step in the run (epochs before it included); `stop`
    reads this process's stop flag; `recorder` (rank 0) gets each step's gradients at the step and
    its loss at the check.
    """

    def __init__(
        self,
        *,
        rank: Rank,
        device: torch.device,
        first_step: int,
        interval: int,
        stop: Callable[[], bool],
        recorder: RuleRecorder | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval={interval}: checks need at least one step between them")
        self.rank = rank
        self.device = device
        self.interval = interval
        self.stop = stop
        self.recorder = recorder
        self._next = first_step
        self._losses: list[torch.Tensor] = []  # the unchecked steps' losses, on the device

    def after_step(self, loss: torch.Tensor) -> bool:
        """Step `loss` (a scalar on the device) ended: True when every process stops here.

        NonFiniteLossError at a check that finds a NaN or infinite loss on any process."""
        step = self._next
        self._next += 1
        if self.recorder is not None:
            self.recorder.record_gradients(step)
        self._losses.append(loss.detach())
        if not self.rank.distributed and self.stop():
            return self._check()
        if len(self._losses) >= self.interval:
            return self._check()
        return False

    def finish(self) -> bool:
        """The epoch's steps ran out: check the steps since the last check; True to stop."""
        return self._check() if self._losses else False

    def _check(self) -> bool:
        values = torch.stack(self._losses).tolist()  # the one wait for the device
        self._losses.clear()
        first = self._next - len(values)
        bad = next((first + i for i, v in enumerate(values) if not math.isfinite(v)), None)
        stopping, diverged_at = self.stop(), bad
        if self.rank.distributed:
            # The earliest step any process saw diverge (as -step, so the maximum is the minimum).
            agreed = distributed.all_max(
                (float(stopping), -math.inf if bad is None else -float(bad)), self.rank, self.device
            )
            stopping = agreed[0] > 0
            diverged_at = None if math.isinf(agreed[1]) else int(-agreed[1])
        end = len(values) if diverged_at is None else diverged_at - first + 1
        if self.recorder is not None:
            for i, value in enumerate(values[:end]):
                self.recorder.record_loss(first + i, value)
        if diverged_at is not None:
            mine = values[diverged_at - first]
            raise NonFiniteLossError(
                diverged_at, None if math.isfinite(mine) else mine, self._next - 1
            )
        return stopping
