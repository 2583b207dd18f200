"""Connecting the driver to Ray: a private local dev-mode instance, or a Ray that is already up.

This is the only module that calls ``ray.init``. Local dev mode declares the tier resources on the
single node, so actors are placed by exactly the same resource requests as on a real cluster.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray

from ..actors.placement import TIER_RESOURCES
from ..config import Config


@dataclass(frozen=True)
class ClusterInfo:
    mode: str  # "local" (started here) or "existing" (already initialised by the caller)
    resources: dict[str, float]


def required_resources(cfg: Config) -> dict[str, float]:
    """What one run asks of Ray: one tier resource per actor plus the tiers' CPUs and GPUs."""
    t = cfg.topology
    return {
        TIER_RESOURCES["cloud"]: 1,
        TIER_RESOURCES["edge"]: t.edges,
        TIER_RESOURCES["end"]: t.num_devices,
        "CPU": t.cloud.num_cpus + t.edges * t.edge.num_cpus + t.num_devices * t.end.num_cpus,
        "GPU": t.cloud.num_gpus + t.edges * t.edge.num_gpus + t.num_devices * t.end.num_gpus,
    }


def local_init_kwargs(cfg: Config) -> dict:
    """``ray.init`` arguments for a private single-node instance that fits ``cfg``.

    Logical CPUs are declared as max(host CPUs, what the tiers ask for): in dev mode several tier
    actors share the host's cores (each bounds its torch threads), which is the point of the mode.
    """
    need = required_resources(cfg)
    num_cpus = cfg.run.local_num_cpus or max(os.cpu_count() or 1, math.ceil(need["CPU"]))
    return {
        "address": "local",  # never join a leftover cluster (see ../shared/environment.md)
        "num_cpus": num_cpus,
        "resources": {k: v for k, v in need.items() if k not in ("CPU", "GPU")},
        "include_dashboard": False,
        "namespace": "gaisnet",
        "log_to_driver": True,
        "configure_logging": False,
    }


@contextmanager
def connect(cfg: Config) -> Iterator[ClusterInfo]:
    """Use the Ray instance this process already initialised, or start a private local one.

    A local instance started here is shut down on exit, also after an error.
    """
    if ray.is_initialized():
        yield ClusterInfo("existing", dict(ray.cluster_resources()))
        return
    ray.init(**local_init_kwargs(cfg))
    try:
        yield ClusterInfo("local", dict(ray.cluster_resources()))
    finally:
        ray.shutdown()
