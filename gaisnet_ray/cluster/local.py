"""Connecting the driver to Ray: a private local dev-mode instance, or a Ray that is already up.

This is the only module that calls ``ray.init``. Local dev mode declares the tier resources on the
single node, so actors are placed by exactly the same resource requests as on a real cluster.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray

from ..config import TIER_RESOURCES, Config


@dataclass(frozen=True)
class ClusterInfo:
    mode: str  # "local" (started here) or "existing" (already initialised by the caller)
    resources: dict[str, float]


def required_resources(cfg: Config, training: bool = True, serving: bool = False) -> dict[str, float]:
    """What a run asks of Ray: one tier resource per actor (``cloud.workers`` for the cloud) plus the
    tiers' CPUs and GPUs when
    ``training``, and the Serve deployments' share of them when ``serving``.

    Tier resources are rounded up to whole units: a node declares ``gaisnet_edge: 2``, not 2.03.
    """
    t = cfg.topology
    need = {TIER_RESOURCES["cloud"]: 0.0, TIER_RESOURCES["edge"]: 0.0, TIER_RESOURCES["end"]: 0.0,
            "CPU": 0.0, "GPU": 0.0}
    if training:
        workers = cfg.cloud.workers  # the CloudNode and its peer CloudWorkers
        need[TIER_RESOURCES["cloud"]] += workers
        need[TIER_RESOURCES["edge"]] += t.edges
        need[TIER_RESOURCES["end"]] += t.num_devices
        need["CPU"] += workers * t.cloud.num_cpus + t.edges * t.edge.num_cpus + t.num_devices * t.end.num_cpus
        need["GPU"] += workers * t.cloud.num_gpus + t.edges * t.edge.num_gpus + t.num_devices * t.end.num_gpus
    if serving:
        for k, v in cfg.serve.required_resources().items():
            need[k] += v
    for k in TIER_RESOURCES.values():
        need[k] = math.ceil(need[k])
    return need


def local_init_kwargs(cfg: Config, training: bool = True, serving: bool = False) -> dict:
    """``ray.init`` arguments for a private single-node instance that fits ``cfg``.

    Logical CPUs are declared as max(host CPUs, what the tiers ask for): in dev mode several tier
    actors share the host's cores (each bounds its torch threads), which is the point of the mode.
    """
    need = required_resources(cfg, training, serving)
    num_cpus = cfg.run.local_num_cpus or max(os.cpu_count() or 1, math.ceil(need["CPU"]))
    return {
        "address": "local",  # never join a leftover cluster (see ../shared/environment.md)
        "num_cpus": num_cpus,
        "resources": {k: v for k, v in need.items() if k not in ("CPU", "GPU") and v > 0},
        "include_dashboard": False,
        "namespace": "gaisnet",
        "log_to_driver": True,
        "configure_logging": False,
    }


@contextmanager
def connect(cfg: Config, training: bool = True, serving: bool = False) -> Iterator[ClusterInfo]:
    """Use the Ray instance this process already initialised, or start a private local one sized
    for what will run on it (the training actors, the Serve deployments, or both).

    A local instance started here is shut down on exit, also after an error or a SIGTERM.
    """
    if ray.is_initialized():
        yield ClusterInfo("existing", dict(ray.cluster_resources()))
        return
    ray.init(**local_init_kwargs(cfg, training, serving))
    previous = _sigterm_as_interrupt()
    try:
        yield ClusterInfo("local", dict(ray.cluster_resources()))
    finally:
        ray.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """``ray.init`` makes SIGTERM a bare ``sys.exit`` in the driver; turn it into a KeyboardInterrupt
    instead, so a ``kill`` unwinds like Ctrl-C (actors, Serve, then Ray stopped in order). Returns the
    handler it replaced (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)
