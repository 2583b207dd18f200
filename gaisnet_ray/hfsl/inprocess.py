"""The whole GaisNet cycle in one process, with the same core objects and direct calls.

This is what the Ray runtime does minus Ray: it is the baseline for the overhead benchmark and the
reference the distributed run is checked against (same seeds -> same knowledge).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import Config
from ..data import device_examples
from ..models.parts import ModelPart
from ..models.split import edge_part
from .cloud import CloudCore
from .device import DeviceTrainer
from .edge import EdgeTrainer
from .messages import EdgeUpdate, StateDict
from .plan import device_cut, devices_by_edge, participants, plan_clusters


def device_seed(cfg: Config, device: str) -> int:
    """Per-device batch-order seed, stable across processes (no Python hash())."""
    e, d = (int(x) for x in device.split("-")[1:])
    return cfg.training.seed * 1_000_003 + e * 10_007 + d


# ------------------------------------------------------------------------ what each tier holds
def device_part(cfg: Config, device: str, num_layers: int) -> ModelPart:
    """The part of the foundation ``device`` holds: its front and back blocks, embeddings, final
    norm and head; the whole model under FL (that is the scheme)."""
    if cfg.training.scheme == "fl":
        return ModelPart.whole()
    return device_cut(cfg.topology, device, num_layers).device_part(num_layers)


def edge_part_of(cfg: Config, devices: list[str], num_layers: int) -> ModelPart:
    """The part an edge serving ``devices`` holds: their middle blocks (nothing under FL)."""
    if cfg.training.scheme == "fl":
        return ModelPart.of((), embeddings=False, head=False)
    return edge_part(device_cut(cfg.topology, d, num_layers) for d in devices)


def tier_parts(cfg: Config, num_layers: int) -> dict[str, ModelPart]:
    """Node id -> the part it holds, for every edge and end device of the topology."""
    by_edge = devices_by_edge(cfg.topology)
    out = {e: edge_part_of(cfg, ds, num_layers) for e, ds in by_edge.items()}
    out.update({d: device_part(cfg, d, num_layers) for ds in by_edge.values() for d in ds})
    return out


def package_for(packages: list, part: ModelPart):
    """The first of ``packages`` (``FoundationPackage``s) that holds ``part``."""
    for p in packages:
        if p.part_spec.covers(part, p.num_layers):
            return p
    raise ValueError(f"no package holds {part}; given: {[str(p.part_spec) for p in packages]}")


# ---------------------------------------------------------------------------------- factories
def edge_trainer(cfg: Config, edge: str, devices: list[str], package, torch_device: str = "cpu") -> EdgeTrainer:
    """``package``: the edge's part (``edge_part_of``) or any package holding it, e.g. the whole."""
    n = package.num_layers
    cuts = {d: device_cut(cfg.topology, d, n) for d in devices}
    return EdgeTrainer(edge, package, cfg.peft, cfg.training, cuts, cfg.links.end_edge, torch_device)


def device_trainer(cfg: Config, device: str, package, torch_device: str = "cpu") -> DeviceTrainer:
    """A device with its own private examples (it derives them itself; they are never sent)."""
    return device_trainers(cfg, [device], package, torch_device)[device]


def device_trainers(cfg: Config, devices: list[str], packages, torch_device: str = "cpu",
                    share_model: bool = False) -> dict[str, DeviceTrainer]:
    """Logical devices, each with its own private examples (derived here from the data config,
    never sent). ``packages``: one ``FoundationPackage`` or several (a pool worker gets one part per
    cut of its devices); each device builds only its part. ``share_model``: one tier model per part
    for all of them (a pool worker)."""
    all_ids = [d for ds in devices_by_edge(cfg.topology).values() for d in ds]
    examples = device_examples(cfg.data, all_ids)
    packages = [packages] if hasattr(packages, "state_dict") else list(packages)
    n = packages[0].num_layers
    shared: dict = {}
    out = {}
    for d in devices:
        part = device_part(cfg, d, n)
        cut = None if cfg.training.scheme == "fl" else device_cut(cfg.topology, d, n)
        split = shared.get(part) if share_model else None
        out[d] = DeviceTrainer(d, package_for(packages, part), cfg.peft, cfg.training, examples[d],
                               cfg.model.max_seq_len, cut, device_seed(cfg, d), torch_device, split=split,
                               system=cfg.data.system_prompt, privacy=cfg.privacy)
        if share_model:
            shared.setdefault(part, out[d].split)
    return out


def relay_down_bytes(written: dict[str, int]) -> dict:
    """Bytes of the new base each edge and device took (each keeps only the segments it runs)."""
    edges = sum(v for k, v in written.items() if k.startswith("edge-"))
    ends = sum(v for k, v in written.items() if k.startswith("end-"))
    return {"edge_cloud_down": edges, "end_edge_down": ends, "per_node": written}


class DirectEdgeLink:
    """EdgeLink over a direct method call (same process)."""

    def __init__(self, edge: EdgeTrainer, cluster_id: str, device_id: str):
        self.edge, self.cluster_id, self.device_id = edge, cluster_id, device_id

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.edge.forward(self.cluster_id, self.device_id, hidden)

    def backward(self, grad: torch.Tensor) -> torch.Tensor:
        return self.edge.backward(self.cluster_id, self.device_id, grad)


class InProcessGaisNet:
    def __init__(self, cfg: Config, run_dir: str | Path):
        from ..planner.command import sample_counts
        from ..planner.runtime import prepare_run

        # the planner, as in the Ray driver: the plan's cuts go into the config every tier builds from
        self.cfg, self.run_plan = prepare_run(cfg, sample_counts=sample_counts(cfg), run_dir=run_dir)
        cfg = self.cfg
        self._clusters: dict[str, dict[str, list[str]]] = {}  # this round's, per edge (for the cost model)
        self.cloud = CloudCore(cfg, run_dir)
        package = self.cloud.package
        self.by_edge = devices_by_edge(cfg.topology)
        parts = tier_parts(cfg, package.num_layers)  # each tier gets (and builds) only its part
        self.edges = {e: edge_trainer(cfg, e, ds, package.cut(parts[e])) for e, ds in self.by_edge.items()}
        self.devices = {d: device_trainer(cfg, d, package.cut(parts[d])) for ds in self.by_edge.values() for d in ds}
        self.knowledge: StateDict = self.cloud.initial_knowledge()

    def edge_round(self, edge: str, round_idx: int | None = None) -> EdgeUpdate:
        trainer = self.edges[edge]
        plan = self.run_plan
        trains = [d for d in self.by_edge[edge] if plan is None or plan.trains(d)]
        chosen = participants(self.cfg, edge, trains, round_idx)
        clusters = plan_clusters(self.cfg, edge, {d: self.devices[d].num_samples for d in chosen},
                                 plan.clusters_of(edge) if plan else None)
        self._clusters[edge] = clusters
        trainer.begin_round(self.knowledge, clusters)
        last = {}
        for cid, members in clusters.items():
            previous = None
            for d in members:
                adapter = trainer.begin_turn(cid, d, previous)
                previous = self.devices[d].train_turn(adapter, DirectEdgeLink(trainer, cid, d), cid,
                                                      self.cfg.training.local_steps, round_idx,
                                                      plan.emulation(edge, clusters, cid, d) if plan else None)
            last[cid] = previous
        return trainer.finish_round(last)

    def run_round(self, round_idx: int) -> dict:
        started = time.perf_counter()
        self._clusters = {}
        updates = [self.edge_round(e, round_idx) for e in self.by_edge]
        train_s = time.perf_counter() - started  # edges one after another here, in parallel on Ray
        self.knowledge, metrics = self.cloud.aggregate_round(round_idx, updates)
        if self.run_plan is not None:
            metrics["plan"] = {**self.run_plan.metrics(self._clusters), "measured_train_s": train_s}
        if "relay" in metrics:  # relay down: each edge and device gets its part of the new base
            base = self.cloud.package
            metrics["relay"]["bytes_down"] = relay_down_bytes(
                {**{e: t.update_base(base.cut(t.part)) for e, t in self.edges.items()},
                 **{d: t.update_base(base.cut(t.part)) for d, t in self.devices.items()}})
        return metrics
