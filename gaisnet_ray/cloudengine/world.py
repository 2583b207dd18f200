"""The training world of the cloud engine: one process here (rank 0 of 1), set up safely.

DeepSpeed needs a ``torch.distributed`` process group even for one process. ``open_world`` joins a
group that already exists (a launcher's, or one a test opened), or creates a single-process gloo
group (nccl on CUDA) and says so, so that only its creator tears it down (``close_world``:
barrier, then destroy; without the barrier multi-process worlds sometimes abort at exit).
Environment variables are set only where absent, and those this module set are removed again.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass, field

__all__ = ["World", "WorldError", "close_world", "ensure_accelerator", "open_world"]

# torch 2.13 deprecates the collectives DeepSpeed 0.19 calls and warns on every call (seen at
# ZeRO 1-3 on one rank: all_gather_into_tensor every step, reduce_scatter_tensor at build);
# filter those messages only (by text), never all warnings.
_DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
)


class WorldError(RuntimeError):
    """The process-group environment does not fit a single-process cloud world."""


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_world(workers: int = 1) -> World:
    """Join the existing process group, or create a single-process one."""
    import torch.distributed as dist

    quiet_collective_warnings()
    if dist.is_initialized():
        size = dist.get_world_size()
        if size != workers:
            raise WorldError(f"the process group has {size} ranks but cloud.workers is {workers}")
        return World(backend=str(dist.get_backend()), created=False)
    if workers != 1:
        raise WorldError(f"cloud.workers ({workers}) > 1 needs a launcher that forms the world; "
                         "this version creates single-process worlds only")
    size = os.environ.get("WORLD_SIZE")
    if size is not None and size != "1":
        raise WorldError(f"WORLD_SIZE is {size} in the environment but cloud.workers is 1; "
                         "unset it or start the engine under the launcher that set it")
    wanted = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    env_set = []
    for name, value in wanted.items():
        if name not in os.environ:
            os.environ[name] = value if value is not None else str(_free_port())
            env_set.append(name)
    accelerator = ensure_accelerator()
    import deepspeed

    backend = "gloo" if accelerator == "cpu" else None  # None: the accelerator's own (nccl on CUDA)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
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
