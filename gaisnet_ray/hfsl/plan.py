"""Who trains with whom this round: topology, cut points per device, clusters per edge."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ..config import Config, TopologyConfig, device_id, edge_id
from .clustering import DeviceProfile, cluster_devices

if TYPE_CHECKING:  # imported where used: the planner reads this module without torch
    from ..models.split import Cut


def devices_by_edge(topo: TopologyConfig) -> dict[str, list[str]]:
    return {edge_id(e): [device_id(e, d) for d in range(topo.devices_per_edge)] for e in range(topo.edges)}


def device_compute(topo: TopologyConfig, device: str) -> float:
    e, d = (int(x) for x in device.split("-")[1:])
    return topo.device_compute[(e * topo.devices_per_edge + d) % len(topo.device_compute)]


def device_cut(topo: TopologyConfig, device: str, num_layers: int) -> "Cut":
    from ..models.split import Cut

    c = topo.cut_for(device)
    try:
        return Cut.from_layers(num_layers, c.front_layers, c.back_layers)
    except ValueError as e:
        raise ValueError(f"topology cut for {device}: {e}") from None


def participants(cfg: Config, edge: str, devices: list[str], round_idx: int | None) -> list[str]:
    """The devices of ``edge`` that train in round ``round_idx``: all of them, or a seeded sample of
    ``training.participants_per_edge`` (the same in every runtime and on resume)."""
    k = cfg.training.participants_per_edge
    if not k or len(devices) <= k or round_idx is None:
        return list(devices)
    rng = random.Random(f"{cfg.training.seed}/{round_idx}/{edge}")  # str seeds hash stably (sha512)
    chosen = set(rng.sample(sorted(devices), k))
    return [d for d in devices if d in chosen]


def plan_clusters(cfg: Config, edge: str, sample_counts: dict[str, int],
                  planned: list[list[str]] | None = None) -> dict[str, list[str]]:
    """Cluster id -> member device ids in training order, for one edge and one round.
    ``planned``: the planner's clusters of this edge (``topology.planner`` not fixed); the devices
    of this round keep them, and devices it did not plan here (moved from a lost edge) are
    clustered as usual after them."""
    devices = list(sample_counts)
    scheme = cfg.training.scheme
    if scheme == "fl":
        groups = [[d] for d in devices]
    elif scheme == "sl":
        groups = [devices]
    elif planned is not None:
        live = set(devices)
        groups = [g for g in ([d for d in c if d in live] for c in planned) if g]
        seen = {d for c in planned for d in c}
        rest = [d for d in devices if d not in seen]
        if rest:
            groups += plan_clusters(cfg, edge, {d: sample_counts[d] for d in rest}).values()
    else:
        profiles = [DeviceProfile(d, sample_counts[d], device_compute(cfg.topology, d)) for d in devices]
        groups = cluster_devices(profiles, cfg.topology.cluster_size, cfg.topology.clustering)
    return {f"{edge}/c{i}": g for i, g in enumerate(groups)}
