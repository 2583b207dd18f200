"""Device and edge profiles: what the cost model needs to know about each node of the fleet.

A device's profile is its compute speed (FLOP/s), the memory it can give to training, its link to
its edge (uplink/downlink bandwidth, latency per message) and its energy coefficients (J per FLOP,
J per byte sent and received). An edge has a compute speed, shared by its concurrent clusters, and
one link to its devices whose bandwidth its concurrent clusters share; its link to the cloud is
``links.edge_cloud``. Profiles come from the config: ``planner.fleet: host`` (every device like
this host, scaled by ``topology.device_compute``), or ``classes`` (a seeded draw from named device
classes with spreads), with ``planner.devices`` overriding single devices either way.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from ..config import Config, ConfigError, DeviceSpec
from ..schemes.topology import device_compute, devices_by_edge

GIGA = 1e9
MEGA = 1e6


@dataclass(frozen=True)
class DeviceProfile:
    device_id: str
    edge_id: str
    kind: str  # the class it was drawn from ("host", "phone" ...), or "explicit"
    flops: float  # FLOP/s of LoRA training
    memory_bytes: float | None  # what it can give to training; None: no limit
    up_bps: float  # bits/s device -> edge
    down_bps: float  # bits/s edge -> device
    latency_s: float  # one way, per message
    j_per_flop: float
    j_per_byte_up: float
    j_per_byte_down: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EdgeProfile:
    edge_id: str
    flops: float  # shared by the edge's concurrent clusters
    bandwidth_bps: float  # its link to its devices, shared by its concurrent clusters
    cloud_bps: float  # its link to the cloud (links.edge_cloud)
    cloud_latency_s: float


@dataclass(frozen=True)
class Fleet:
    devices: tuple[DeviceProfile, ...]
    edges: tuple[EdgeProfile, ...]
    cloud_flops: float
    host_flops: float

    def by_edge(self) -> dict[str, list[DeviceProfile]]:
        out: dict[str, list[DeviceProfile]] = {e.edge_id: [] for e in self.edges}
        for d in self.devices:
            out[d.edge_id].append(d)
        return out

    def __post_init__(self):
        object.__setattr__(self, "_index", {d.device_id: d for d in self.devices} | {e.edge_id: e for e in self.edges})

    def edge(self, edge_id: str) -> EdgeProfile:
        return self._index[edge_id]

    def device(self, device_id: str) -> DeviceProfile:
        return self._index[device_id]


def _profile(device: str, edge: str, kind: str, spec: DeviceSpec, cfg: Config, factor: float = 1.0,
             flops: float | None = None) -> DeviceProfile:
    link = cfg.links.end_edge
    mbps = link.bandwidth_mbps
    return DeviceProfile(
        device, edge, kind,
        flops=flops if flops is not None else spec.gflops * GIGA * factor,
        memory_bytes=None if spec.memory_gb is None else spec.memory_gb * GIGA * factor,
        up_bps=(spec.uplink_mbps or mbps) * MEGA * factor,
        down_bps=(spec.downlink_mbps or mbps) * MEGA * factor,
        latency_s=(link.latency_ms if spec.latency_ms is None else spec.latency_ms) / 1e3,
        j_per_flop=spec.j_per_gflop / GIGA, j_per_byte_up=spec.j_per_mb_up / MEGA,
        j_per_byte_down=spec.j_per_mb_down / MEGA)


def _draw_class(cfg: Config, device: str) -> tuple[str, float]:
    """The class of a generated fleet's device and its spread factor, seeded per device (stable
    whatever the fleet's size)."""
    classes = cfg.planner.classes
    if not classes:
        raise ConfigError("invalid value for 'planner.classes': planner.fleet 'classes' needs at least one class")
    rng = random.Random(f"{cfg.planner.seed}/{device}")  # str seeds hash stably (sha512)
    names = sorted(classes)
    name = rng.choices(names, weights=[classes[n].share for n in names])[0]
    spread = classes[name].spread
    return name, rng.uniform(1 - spread, 1 + spread)


def build_fleet(cfg: Config, host_gflops: float) -> Fleet:
    """The fleet of ``cfg``'s topology. ``host_gflops``: this host's calibrated speed (the
    ``host`` fleet's devices, and edges and cloud without a speed of their own)."""
    p, topo = cfg.planner, cfg.topology
    by_edge = devices_by_edge(topo)
    known = {d for ds in by_edge.values() for d in ds}
    unknown = sorted(set(p.devices) - known)
    if unknown:
        raise ConfigError(f"invalid value for 'planner.devices': unknown devices {unknown[:8]}")
    host = host_gflops * GIGA
    devices = []
    for e, ds in by_edge.items():
        for d in ds:
            if d in p.devices:
                devices.append(_profile(d, e, "explicit", p.devices[d], cfg))
            elif p.fleet == "classes":
                name, factor = _draw_class(cfg, d)
                devices.append(_profile(d, e, name, p.classes[name], cfg, factor))
            else:
                devices.append(_profile(d, e, "host", DeviceSpec(gflops=host_gflops), cfg,
                                        flops=host * device_compute(topo, d)))
    bandwidth = (p.edge_bandwidth_mbps or cfg.links.end_edge.bandwidth_mbps) * MEGA
    edge_flops = (p.edge_gflops or host_gflops) * GIGA
    up = cfg.links.edge_cloud
    edges = tuple(EdgeProfile(e, edge_flops, bandwidth, up.bandwidth_mbps * MEGA, up.latency_ms / 1e3)
                  for e in by_edge)
    return Fleet(tuple(devices), edges, (p.cloud_gflops or host_gflops) * GIGA, host)
