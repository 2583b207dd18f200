"""Tier resources: every tier actor asks Ray for its tier's custom resource plus CPUs/GPUs.

A real cluster's nodes declare these resources (``ray start --resources='{"gaisnet_edge": 4}'``);
local dev mode declares them on the single node. Nothing here assumes one node.
"""

from __future__ import annotations

import functools
import os

from ..config import TIER_RESOURCES, TierResources


def tier_options(tier: str, res: TierResources, name: str | None = None) -> dict:
    opts = {
        "resources": {TIER_RESOURCES[tier]: 1},
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
    }
    if res.node_labels:  # Ray's label-based scheduling: only nodes started with these labels qualify
        opts["label_selector"] = dict(res.node_labels)
    if name:
        opts["name"] = name
    return opts


def setup_worker(torch_threads: int, num_gpus: float) -> str:
    """Bound torch threads in this actor (many actors share few cores); pick CUDA if given a GPU."""
    import warnings

    import torch

    torch.set_num_threads(torch_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft calls a transformers API that transformers 5 deprecates, once per model: not the user's concern
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def setup_tier_worker(cfg, tier: str) -> str:
    """``setup_worker`` for an actor of ``tier``: its ``topology.<tier>.torch_threads`` (else
    ``run.torch_threads``) and ``num_gpus``."""
    res = getattr(cfg.topology, tier)
    return setup_worker(res.torch_threads or cfg.run.torch_threads, res.num_gpus)


def crosses_boundary(method):
    """Record the method's arguments (in) and return value (out) in the actor's message audit."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._audit.record(method.__name__, "in", {"args": list(args), "kwargs": kwargs})
        out = method(self, *args, **kwargs)
        self._audit.record(method.__name__, "out", out)
        return out

    return wrapper


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``ru_maxrss``), in MB (10^6 bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


class AuditedNode:
    """What every tier actor shares: a message audit (``self._audit``), dumped on request, and its
    own peak memory."""

    def dump_audit(self, directory: str) -> str | None:
        path = self._audit.dump(directory)
        return str(path) if path else None

    def peak_rss_mb(self) -> float:
        """The actor's peak RSS so far (MB); the driver records it per actor kind every round."""
        return peak_rss_mb()


class BaseHolderNode(AuditedNode):
    """A tier actor over one trainer (``self.core``) that holds part of the foundation model."""

    @crosses_boundary
    def update_base(self, package) -> int:
        """Relay down: load this node's part of the new base (it holds exactly what the node holds);
        returns the bytes taken."""
        return self.core.update_base(package)
