"""The training world of the cloud engine: one process, or several cloud workers in one group.

DeepSpeed needs a ``torch.distributed`` process group even for one process. ``open_world`` joins a
group that already exists (a launcher's, or one a test opened), or creates one: a single-process
group for one worker, or, given a ``WorldSpec`` (rank, size, rendezvous address), this process's
rank of a multi-process group: gloo on CPU (DS_ACCELERATOR=cpu), nccl on CUDA. Whoever created the
group tears it down (``close_world``: barrier, then destroy; without the barrier multi-process
worlds sometimes abort at exit). Environment variables are set only where absent, and those this
module set are removed again. Who starts the other ranks is the caller's business
(``actors/cloudworld.py`` starts them as Ray actors).
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass, field

__all__ = ["World", "WorldError", "WorldSpec", "close_world", "ensure_accelerator", "open_world"]

# torch 2.13 deprecates the collectives DeepSpeed 0.19 calls and warns on every call (seen at
# ZeRO 1-3 on one rank: all_gather_into_tensor every step, reduce_scatter_tensor at build);
# filter those messages only (by text), never all warnings.
_DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)


class WorldError(RuntimeError):
    """The process-group environment does not fit a single-process cloud world."""


@dataclass(frozen=True)
class WorldSpec:
    """This process's place in a multi-process cloud world: rank ``rank`` of ``size``, meeting the
    others at ``master_addr:master_port`` (rank 0's host and a port free there)."""

    rank: int
    size: int
    master_addr: str
    master_port: int

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise WorldError(f"rank {self.rank} is outside a world of {self.size}")


@dataclass
class World:
    """The process group the engine trains in, and what this process did to get it."""

    backend: str
    created: bool  # True: this process created the group and must destroy it
    env_set: list[str] = field(default_factory=list)  # environment variables set here (removed on close)


def quiet_collective_warnings() -> None:
    for message in _DEPRECATED_COLLECTIVES:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def ensure_accelerator() -> str:
    """Point DeepSpeed at the CPU when no CUDA device exists (before deepspeed is imported)."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def process_rank() -> int:
    """This process's rank in the torch.distributed world it is in; 0 outside one."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_world(workers: int = 1, spec: WorldSpec | None = None, timeout_s: float = 300.0) -> World:
    """Join the existing process group, or create this process's part of a new one.

    ``workers`` is ``cloud.workers``; more than one needs ``spec`` (rank and rendezvous), and every
    rank must call this within ``timeout_s`` of the others.
    """
    import datetime

    import torch.distributed as dist

    quiet_collective_warnings()
    if dist.is_initialized():
        size = dist.get_world_size()
        if size != workers:
            raise WorldError(f"the process group has {size} ranks but cloud.workers is {workers}")
        return World(backend=str(dist.get_backend()), created=False)
    if spec is None and workers != 1:
        raise WorldError(f"cloud.workers ({workers}) > 1 needs each worker's rank and the rendezvous address "
                         "(a WorldSpec; the Ray runtime's cloud world provides them)")
    if spec is not None and spec.size != workers:
        raise WorldError(f"the world spec has {spec.size} ranks but cloud.workers is {workers}")
    size = os.environ.get("WORLD_SIZE")
    if spec is None and size is not None and size != "1":
        raise WorldError(f"WORLD_SIZE is {size} in the environment but cloud.workers is 1; "
                         "unset it or start the engine under the launcher that set it")
    if spec is None:
        wanted = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    else:  # the spec decides: stale values from an earlier world must not leak into this one
        wanted = {"MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port), "RANK": str(spec.rank),
                  "WORLD_SIZE": str(spec.size), "LOCAL_RANK": "0"}
        clash = {k: os.environ[k] for k, v in wanted.items() if k in os.environ and os.environ[k] != v}
        if clash:
            raise WorldError(f"the environment already sets {clash}, which contradicts this worker's world spec "
                             f"{spec}; unset them")
        if spec.master_addr in ("127.0.0.1", "localhost"):
            wanted["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own connections on loopback too
    env_set = []
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = value if value is not None else str(free_port())
            env_set.append(name)
    accelerator = ensure_accelerator()
    import deepspeed

    backend = "gloo" if accelerator == "cpu" else None  # None: the accelerator's own (nccl on CUDA)
    try:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException:
        for name in env_set:
            os.environ.pop(name, None)
        raise
    return World(backend=str(dist.get_backend()), created=True, env_set=env_set)


def close_world(world: World) -> None:
    """Barrier + destroy the group if ``world`` created it; remove the variables it set."""
    import torch.distributed as dist

    if world.created and dist.is_initialized():
        import deepspeed.comm

        dist.barrier()
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so a later world works
    for name in world.env_set:
        os.environ.pop(name, None)
    world.env_set = []
    world.created = False
