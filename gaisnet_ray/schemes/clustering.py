"""Group an edge's devices into HFSL clusters of a configured size.

``balanced`` sorts devices by their expected turn time (samples / compute) and assigns each, longest
first, to the cluster with the least total time that still has room (LPT scheduling), so clusters,
which run in parallel, finish at about the same time. ``sequential`` keeps id order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    device_id: str
    num_samples: int
    compute: float  # relative speed; a device with compute 0.5 takes twice as long per sample

    @property
    def load(self) -> float:
        return self.num_samples / self.compute


def cluster_devices(devices: list[DeviceProfile], cluster_size: int, method: str = "balanced") -> list[list[str]]:
    if cluster_size < 1:
        raise ValueError(f"cluster_size must be >= 1, got {cluster_size}")
    if not devices:
        return []
    n_clusters = math.ceil(len(devices) / cluster_size)
    if method == "sequential":
        ids = [d.device_id for d in devices]
        return [ids[i : i + cluster_size] for i in range(0, len(ids), cluster_size)]
    if method != "balanced":
        raise ValueError(f"unknown clustering method '{method}': use 'balanced' or 'sequential'")
    clusters: list[list[DeviceProfile]] = [[] for _ in range(n_clusters)]
    loads = [0.0] * n_clusters
    for d in sorted(devices, key=lambda d: (-d.load, d.device_id)):
        open_ = [i for i in range(n_clusters) if len(clusters[i]) < cluster_size]
        i = min(open_, key=lambda i: (loads[i], i))
        clusters[i].append(d)
        loads[i] += d.load
    # Within a cluster, faster devices go first (the edge's turn pipeline starts sooner).
    return [[d.device_id for d in sorted(c, key=lambda d: (d.load, d.device_id))] for c in clusters if c]
