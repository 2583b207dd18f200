"""``planner:``: the device fleet's profiles and how the round is planned (the planner itself is
``gaisnet_ray.planner``). ``topology.planner`` picks the planner (fixed | balanced | optimized)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .section import Section


class DeviceSpec(Section):
    """One device's profile (``planner.devices``), or the centre of a class (``planner.classes``)."""

    gflops: float = Field(gt=0, description="Sustained compute speed of LoRA training, GFLOP/s.")
    memory_gb: float | None = Field(
        None, gt=0, description="Memory the device can give to training (GB); None: no limit.")
    uplink_mbps: float | None = Field(
        None, gt=0, description="Device -> edge bandwidth (Mbit/s); None: links.end_edge.bandwidth_mbps.")
    downlink_mbps: float | None = Field(
        None, gt=0, description="Edge -> device bandwidth (Mbit/s); None: links.end_edge.bandwidth_mbps.")
    latency_ms: float | None = Field(
        None, ge=0, description="One-way latency per message to the edge (ms); None: links.end_edge.latency_ms.")
    j_per_gflop: float = Field(0.3, ge=0, description="Energy per GFLOP computed on the device (J).")
    j_per_mb_up: float = Field(0.5, ge=0, description="Energy per MB the device sends (J).")
    j_per_mb_down: float = Field(0.2, ge=0, description="Energy per MB the device receives (J).")


class DeviceClass(DeviceSpec):
    share: float = Field(1.0, gt=0, description="Weight of this class in a generated fleet.")
    spread: float = Field(
        0.2, ge=0, lt=1, description="Each device's speed, memory and bandwidth are the class's times a factor "
        "drawn uniformly from [1 - spread, 1 + spread] (seeded per device).")


def _default_classes() -> dict[str, DeviceClass]:
    return {
        "phone": DeviceClass(gflops=10, memory_gb=1.5, uplink_mbps=8, downlink_mbps=30, latency_ms=30,
                             j_per_gflop=0.25, j_per_mb_up=2.0, j_per_mb_down=0.8, share=0.5),
        "laptop": DeviceClass(gflops=60, memory_gb=6, uplink_mbps=40, downlink_mbps=80, latency_ms=15,
                              j_per_gflop=0.4, j_per_mb_up=0.6, j_per_mb_down=0.3, share=0.3),
        "gateway": DeviceClass(gflops=200, memory_gb=16, uplink_mbps=200, downlink_mbps=200, latency_ms=5,
                               j_per_gflop=0.2, j_per_mb_up=0.1, j_per_mb_down=0.1, share=0.2),
    }


class PlannerConfig(Section):
    fleet: Literal["host", "classes"] = Field(
        "host", description="host: every device computes at planner.host_gflops "
        "times its topology.device_compute, no memory limit, links.end_edge links; classes: a seeded "
        "heterogeneous fleet drawn from planner.classes. planner.devices overrides single devices either way.")
    classes: dict[str, DeviceClass] = Field(
        default_factory=_default_classes, description="Named device classes of a generated fleet "
        "(default: phone / laptop / gateway).")
    devices: dict[str, DeviceSpec] = Field(
        default_factory=dict, description="Explicit profiles of single devices, keyed by device id.")
    host_gflops: float | None = Field(
        None, gt=0, description="Compute speed of this host (GFLOP/s); None: calibrated from a measured "
        "training step of the model when a run or `gaisnet plan` needs it.")
    edge_gflops: float | None = Field(
        None, gt=0, description="Compute speed of each edge (shared by its concurrent clusters); None: host_gflops.")
    edge_bandwidth_mbps: float | None = Field(
        None, gt=0, description="Each edge's link to its devices, shared by its concurrent clusters in the "
        "planned shares; None: links.end_edge.bandwidth_mbps.")
    cloud_gflops: float | None = Field(None, gt=0, description="Compute speed of the cloud; None: host_gflops.")
    energy_weight: float = Field(
        0.0, ge=0, description="Seconds of round delay worth one joule of device energy: the optimized planner "
        "minimizes delay + energy_weight x total device energy per round.")
    exact_max_combos: int = Field(
        1000, ge=1, description="Plan an edge by exact search when its clusterings x cut choices are at most "
        "this many; larger edges get the heuristic.")
    seed: int = Field(0, description="Seed of a generated fleet.")
    emulate: bool = Field(
        False, description="Local dev mode: each device's turn takes its profile's time: its own compute the cost "
        "model's FLOPs at its speed (never less than measured), its transfers its link model's time "
        "(reported as emulation in the metrics).")
