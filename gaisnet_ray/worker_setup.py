"""What every worker process runs first: a tier actor and a Serve replica alike.

Many actors and replicas share few cores, so each bounds its torch threads; one given a GPU picks
CUDA. Core module (no Ray), so that both ``actors/`` and ``serve/`` import it without importing
each other; torch is imported only when a worker sets up.
"""

from __future__ import annotations

import os


def setup_worker(torch_threads: int, num_gpus: float) -> str:
    """Bound torch threads in this process (many actors share few cores); pick CUDA if given a GPU;
    silence library output at its source (``logs.quiet_libraries``: progress bars, deprecation and
    advisory warnings that are not the user's concern). Returns the torch device to use."""
    import torch

    from .logs import quiet_libraries

    torch.set_num_threads(torch_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
    quiet_libraries(device)
    return device


def setup_tier_worker(cfg, tier: str) -> str:
    """``setup_worker`` for an actor of ``tier``: its ``topology.<tier>.torch_threads`` (else
    ``run.torch_threads``) and ``num_gpus``."""
    res = getattr(cfg.topology, tier)
    return setup_worker(res.torch_threads or cfg.run.torch_threads, res.num_gpus)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``ru_maxrss``), in MB (10^6 bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux
