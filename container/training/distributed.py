"""Data-parallel training over the GPUs of a host and the hosts of resourceconfig.json.

One process per GPU (or `processes_per_host` on CPU), DDP over NCCL on GPUs and gloo on CPUs; the
master is hosts[0] (docs/sagemaker-contract.md §2.6). A host with several processes starts them and
forwards SIGTERM, because `docker stop` signals PID 1 only.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import (
    ProcessExitedException,
    ProcessRaisedException,
    start_processes,
)

from container.sagemaker_env import ResourceConfig
from container.training.errors import ConfigError

__all__ = [
    "Rank",
    "World",
    "all_max",
    "all_reduce_sum",
    "broadcast_object",
    "join",
    "leave",
    "plan_world",
    "run",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_RESOLVE_TIMEOUT_S = 300.0  # peers' DNS names can appear late (docs/sagemaker-contract.md §2.6)
_INIT_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """The job's process layout; the same on every host."""

    hosts: tuple[str, ...]
    host_rank: int
    processes_per_host: int
    master_addr: str
    master_port: int
    backend: str
    interface: str | None = None

    @property
    def size(self) -> int:
        return len(self.hosts) * self.processes_per_host

    def rank(self, local_rank: int) -> Rank:
        """The place of this host's `local_rank`-th process."""
        return Rank(
            rank=self.host_rank * self.processes_per_host + local_rank,
            local_rank=local_rank,
            world_size=self.size,
            local_world_size=self.processes_per_host,
        )


@dataclass(frozen=True)
class Rank:
    """This process's place in the world."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def plan_world(
    resources: ResourceConfig,
    processes_per_host: int | str,
    master_port: int,
    use_gpus: bool = True,
) -> World:
    """Processes per host (one per GPU unless told) and the master's address; `use_gpus=False`
    (the `device=cpu` hyperparameter) plans for the CPU whatever GPUs the host has."""
    gpus = torch.cuda.device_count() if use_gpus else 0
    if processes_per_host == "auto":
        per_host = max(1, gpus)
    else:
        per_host = int(processes_per_host)
        if gpus and per_host > gpus:
            raise ConfigError(
                f"processes_per_host={per_host} but this host has {gpus} GPUs; use at most {gpus}"
            )
    return World(
        hosts=resources.hosts,
        host_rank=resources.host_rank,
        processes_per_host=per_host,
        # One host: every process is local, whatever the host is called.
        master_addr=resources.master_host if len(resources.hosts) > 1 else "127.0.0.1",
        master_port=master_port,
        backend="nccl" if gpus else "gloo",
        interface=resources.network_interface_name,
    )


def _resolve(host: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.gethostbyname(host)
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"master host {host!r} does not resolve after {timeout_s:.0f} s; check "
                    "resourceconfig.json's hosts"
                ) from None
            time.sleep(1.0)


def join(world: World, rank: Rank) -> None:
    """Join the job's process group (nothing to do for a single process)."""
    if rank.distributed:
        if world.interface:
            # NCCL and gloo take the network interface only from the environment; SageMaker
            # names it in resourceconfig.json (eth0), and other interfaces may not route.
            for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
                os.environ.setdefault(name, world.interface)
        address = _resolve(world.master_addr, _RESOLVE_TIMEOUT_S)
        logger.info(
            "Joining %s process group as rank %d/%d via %s:%d",
            world.backend,
            rank.rank,
            rank.world_size,
            address,
            world.master_port,
        )
        dist.init_process_group(
            world.backend,
            init_method=f"tcp://{address}:{world.master_port}",
            rank=rank.rank,
            world_size=rank.world_size,
            timeout=_INIT_TIMEOUT,
        )


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _child(local_rank: int, main: Callable[[int], int]) -> None:
    code = main(local_rank)
    if code:
        raise SystemExit(code)


def run(world: World, main: Callable[[int], int], preload: tuple[str, ...] = ()) -> int:
    """Run `main(local_rank)` in every process of this host; return the host's exit code.

    A single process runs in place. Several are forked from a fork server that imports `preload`
    (the modules `main` needs) once, instead of each process importing torch and them again as a
    spawned one does: about 4 s of CPU per process on a 2-core AMD EPYC. The server only imports:
    no torch operation or CUDA call runs there, so no thread pool or device state is inherited.
    SIGTERM on the parent is forwarded to them (each stops cleanly) and the parent exits with the
    first non-zero code.
    """
    if world.processes_per_host == 1:
        return main(0)
    multiprocessing.set_forkserver_preload(["torch", *preload])
    context = start_processes(  # type: ignore[no-untyped-call]
        _child,
        args=(main,),
        nprocs=world.processes_per_host,
        join=False,
        start_method="forkserver",
    )

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in context.processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    try:
        while not context.join():
            pass
    except ProcessExitedException as exc:
        logger.error("Training process %d exited with code %s", exc.error_index, exc.exit_code)
        return exc.exit_code or 1
    except ProcessRaisedException as exc:
        logger.error("Training process %d failed:\n%s", exc.error_index, exc)
        return 1
    return 0


def all_reduce_sum(tensor: torch.Tensor, rank: Rank) -> torch.Tensor:
    """Sum a tensor over all processes, in place (a no-op in a single process)."""
    if rank.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_max(values: tuple[float, ...], rank: Rank, device: torch.device) -> tuple[float, ...]:
    """Each value's maximum over all processes, in one all-reduce (float64: step numbers stay
    exact), so that every process takes the same decision (a no-op in a single process)."""
    if not rank.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(tensor.tolist())


def broadcast_object(obj: T | None, rank: Rank) -> T:
    """Rank 0's `obj` on every process."""
    if not rank.distributed:
        assert obj is not None
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def gather_shards(tensors: tuple[torch.Tensor, ...], rank: Rank) -> tuple[torch.Tensor, ...]:
    """Whole-set tensors, in the set's order, from each process's `eval_batches` share (process
    r holds items r, r + world, r + 2 * world, ...): every process gets them all, on the CPU."""
    if not rank.distributed:
        return tensors
    shards: list[Any] = [None] * rank.world_size
    dist.all_gather_object(shards, tuple(t.cpu() for t in tensors))
    total = sum(len(shard[0]) for shard in shards)
    gathered = []
    for i, first in enumerate(tensors):
        whole = torch.empty((total, *first.shape[1:]), dtype=first.dtype)
        for r, shard in enumerate(shards):
            whole[r :: rank.world_size] = shard[i]
        gathered.append(whole)
    return tuple(gathered)
