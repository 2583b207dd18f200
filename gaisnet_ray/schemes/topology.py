"""Who is where: the edges, their devices, each device's cut point and relative compute.

Pure functions of ``topology:`` that every scheme and both runtimes build on; which of these a
round uses (and who trains with whom) is the scheme's decision (``gaisnet_ray.schemes``).
No torch at import: the planner and the CLI's pre-checks read this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import TopologyConfig, device_id, edge_id

if TYPE_CHECKING:  # imported where used
    from ..models.cuts import Cut


def devices_by_edge(topo: TopologyConfig) -> dict[str, list[str]]:
    return {edge_id(e): [device_id(e, d) for d in range(topo.devices_per_edge)] for e in range(topo.edges)}


def deal_to_workers(by_edge: dict[str, list[str]], workers: int) -> dict[str, list[str]]:
    """The logical devices on a pool of ``workers`` EndWorker actors (``topology.end_workers``):
    contiguous runs of the devices in edge order, sizes differing by at most one. A worker runs one
    turn at a time and a cluster's members train in turn, so keeping an edge's devices on one worker
    lets the edges' chains run side by side (dealt round-robin, two edges' concurrent turns met on
    one worker and waited for each other)."""
    devices = [d for ds in by_edge.values() for d in ds]
    n = min(workers, len(devices))
    out, start = {}, 0
    for w in range(n):
        size = len(devices) // n + (w < len(devices) % n)
        out[f"end-worker-{w}"] = devices[start:start + size]
        start += size
    return out


def device_compute(topo: TopologyConfig, device: str) -> float:
    e, d = (int(x) for x in device.split("-")[1:])
    return topo.device_compute[(e * topo.devices_per_edge + d) % len(topo.device_compute)]


def device_cut(topo: TopologyConfig, device: str, num_layers: int) -> "Cut":
    """The configured cut of ``device`` (``topology.device_cuts``, else ``topology.cut``) on a
    model of ``num_layers`` blocks; a cut leaving the edge no block is a ValueError naming it."""
    from ..models.cuts import Cut

    c = topo.cut_for(device)
    try:
        return Cut.from_layers(num_layers, c.front_layers, c.back_layers)
    except ValueError as e:
        raise ValueError(f"topology cut for {device}: {e}") from None
