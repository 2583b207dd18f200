"""``topology:`` and ``links:``: how many edges and devices, where the model is cut, what each
tier's actors ask of Ray, and the modeled links between the tiers; stable node ids."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from .section import Section


class TierResources(Section):
    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs each actor of this tier asks for.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; >0 runs the tier on CUDA.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads of each actor of this tier; None: run.torch_threads. "
        "The cloud works while edges and devices wait (aggregation, evaluation, relay), so it can take more."
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels this tier's actors and Serve replicas must land on "
        "(label_selector, e.g. {gaisnet/tier: edge}), in addition to the tier resource; {}: the resource alone decides."
    )


class CutConfig(Section):
    front_layers: int = Field(1, ge=1, description="Transformer blocks in the device front.")
    back_layers: int = Field(1, ge=1, description="Transformer blocks in the device back.")


class TopologyConfig(Section):
    edges: int = Field(2, ge=1, le=256, description="Edge servers (one EdgeNode actor each).")
    devices_per_edge: int = Field(
        3, ge=1, le=4096, description="End devices per edge (one EndNode each, or logical devices on a pool: "
        "`end_workers`)."
    )
    cluster_size: int = Field(2, ge=1, description="Devices per HFSL cluster (members train in turn).")
    clustering: Literal["balanced", "sequential"] = Field(
        "balanced",
        description="balanced: group by data size and compute so clusters finish together; "
        "sequential: devices in id order.",
    )
    cut: CutConfig = CutConfig()
    device_cuts: dict[str, CutConfig] = Field(
        default_factory=dict, description="Per-device override of `cut`, keyed by device id."
    )
    device_compute: list[float] = Field(
        default_factory=lambda: [1.0, 0.5],
        description="Relative compute speed of devices, cycled over device ids (for clustering).",
    )
    planner: Literal["fixed", "balanced", "optimized"] = Field(
        "fixed", description="fixed: the configured cuts and clustering; balanced: the configured cuts, clusters "
        "balanced by the devices' modeled turn times (planner.*); optimized: each device's cut within its memory, "
        "the clusters and each cluster's share of the edge bandwidth chosen to minimize the modeled round "
        "(`gaisnet plan` shows it)."
    )
    end_workers: int | Literal["auto"] | None = Field(
        "auto", description="Run the end devices as logical devices on this many EndWorker actors (each holds "
        "its devices' data and one model per cut, and runs one turn at a time); None: one EndNode actor per device; "
        "auto: in local dev mode a pool of the host's CPUs when there are more devices than CPUs (else one actor "
        "per device), and on a cluster one actor per device (each device is a machine)."
    )
    cloud: TierResources = TierResources()
    edge: TierResources = TierResources()
    end: TierResources = TierResources(num_cpus=0.25)

    @model_validator(mode="after")
    def _check(self) -> "TopologyConfig":
        if isinstance(self.end_workers, int) and self.end_workers < 1:
            raise ValueError(f"topology.end_workers must be >= 1, auto or null, not {self.end_workers}")
        if any(c <= 0 for c in self.device_compute) or not self.device_compute:
            raise ValueError("topology.device_compute must be a non-empty list of positive numbers")
        known = {device_id(e, d) for e in range(self.edges) for d in range(self.devices_per_edge)}
        unknown = sorted(set(self.device_cuts) - known)
        if unknown:
            raise ValueError(f"topology.device_cuts names unknown devices {unknown}")
        return self

    @property
    def num_devices(self) -> int:
        return self.edges * self.devices_per_edge

    @property
    def end_pool(self) -> int | None:
        """How many EndWorker actors host the devices, or None for one EndNode actor per device.

        ``auto`` is resolved here for local dev mode, where every actor shares this host's cores: a
        process per device would only add imports and memory (each holds torch and a model) once
        the devices outnumber the cores, since no more turns can run at once. ``run_job`` resolves
        ``auto`` to None before it joins a cluster."""
        if self.end_workers != "auto":
            return self.end_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cpus if self.num_devices > cpus else None

    def cut_for(self, device: str) -> CutConfig:
        return self.device_cuts.get(device, self.cut)


def device_id(edge: int, index: int) -> str:
    """Stable id of the ``index``-th device of edge ``edge`` (e.g. ``end-1-2``)."""
    return f"end-{edge}-{index}"


def edge_id(edge: int) -> str:
    return f"edge-{edge}"


# --------------------------------------------------------------------------------------- links
class LinkConfig(Section):
    bandwidth_mbps: float = Field(gt=0, description="Link bandwidth in megabits per second.")
    latency_ms: float = Field(ge=0, description="One-way latency per message in milliseconds.")


class LinksConfig(Section):
    end_edge: LinkConfig = LinkConfig(bandwidth_mbps=20.0, latency_ms=20.0)
    edge_cloud: LinkConfig = LinkConfig(bandwidth_mbps=1000.0, latency_ms=10.0)
    codec: Literal["none", "fp32", "bf16", "int8"] = Field(
        "none", description="How hidden states and their gradients cross the end-edge link (hfsl.linkcodec): "
        "none: fp32 with padding positions, as computed; fp32: padding positions dropped, values exact; bf16: "
        "padding dropped, bfloat16; int8: padding dropped, int8 with a per-token absmax scale. bf16 and int8 "
        "also send adapters between tiers as bfloat16. The byte counts are of what is sent."
    )
