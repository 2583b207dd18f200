"""HFSL: an edge's devices in clusters of ``topology.cluster_size``; clusters train in parallel,
members of a cluster in turn, each device split with its edge (front + back on the device, the
middle on the edge). The scheme GaisNet proposes, and the default."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .clustering import DeviceProfile, cluster_devices
from .topology import device_compute
from .base import Scheme

if TYPE_CHECKING:
    from ..config import Config


class HFSL(Scheme):
    name: ClassVar[str] = "hfsl"
    free_cluster_size: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return "HFSL rounds"

    def cluster_size(self, cfg: Config, devices: int) -> int:
        return cfg.topology.cluster_size

    def clusters(self, cfg: Config, edge: str, sample_counts: dict[str, int],
                 planned: list[list[str]] | None = None) -> list[list[str]]:
        """``topology.clustering`` (balanced | sequential) of this round's devices; with
        ``planned`` (the planner's clusters), the devices keep them, and devices it did not plan
        here (moved from a lost edge) are clustered as usual after them."""
        devices = list(sample_counts)
        if planned is not None:
            live = set(devices)
            groups = [g for g in ([d for d in c if d in live] for c in planned) if g]
            seen = {d for c in planned for d in c}
            rest = {d: n for d, n in sample_counts.items() if d not in seen}
            return groups + self.clusters(cfg, edge, rest) if rest else groups
        profiles = [DeviceProfile(d, sample_counts[d], device_compute(cfg.topology, d)) for d in devices]
        return cluster_devices(profiles, cfg.topology.cluster_size, cfg.topology.clustering)
