"""Who trains with whom this round: the participants of each edge and its clusters.

The topology itself (devices per edge, cuts, compute) is ``topology.py``; how devices are grouped
is the scheme's (``gaisnet_ray.schemes``). No torch at import: the planner reads this module.
"""

from __future__ import annotations

import random

from ..config import Config
from . import scheme_of


def participants(cfg: Config, edge: str, devices: list[str], round_idx: int | None) -> list[str]:
    """The devices of ``edge`` that train in round ``round_idx``: all of them, or a seeded sample of
    ``training.participants_per_edge`` (the same in every runtime and on resume)."""
    fixed = scheme_of(cfg).round_devices(cfg, edge, list(devices))
    if fixed is not None:  # the scheme names them (``centralized``: its one trainer)
        return fixed
    k = cfg.training.participants_per_edge
    if not k or len(devices) <= k or round_idx is None:
        return list(devices)
    rng = random.Random(f"{cfg.training.seed}/{round_idx}/{edge}")  # str seeds hash stably (sha512)
    chosen = set(rng.sample(sorted(devices), k))
    return [d for d in devices if d in chosen]


def plan_clusters(cfg: Config, edge: str, sample_counts: dict[str, int],
                  planned: list[list[str]] | None = None) -> dict[str, list[str]]:
    """Cluster id -> member device ids in training order, for one edge and one round, as the
    scheme groups them. ``planned``: the planner's clusters of this edge (``topology.planner``
    not fixed)."""
    groups = scheme_of(cfg).clusters(cfg, edge, sample_counts, planned)
    return {f"{edge}/c{i}": g for i, g in enumerate(groups)}
