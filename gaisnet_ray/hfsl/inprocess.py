"""The whole GaisNet cycle in one process, with the same core objects and direct calls.

This is what the Ray runtime does minus Ray: it is the baseline for the overhead benchmark and the
reference the distributed run is checked against (same seeds -> same knowledge).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data import device_examples
from .cloud import CloudCore
from .device import DeviceTrainer
from .edge import EdgeTrainer
from .messages import EdgeUpdate, StateDict
from .plan import device_cut, devices_by_edge, participants, plan_clusters


def device_seed(cfg: Config, device: str) -> int:
    """Per-device batch-order seed, stable across processes (no Python hash())."""
    e, d = (int(x) for x in device.split("-")[1:])
    return cfg.training.seed * 1_000_003 + e * 10_007 + d


def num_layers_of(package) -> int:
    return int(package.config.get("n_layer", package.config.get("num_hidden_layers")))


def edge_trainer(cfg: Config, edge: str, devices: list[str], package, torch_device: str = "cpu") -> EdgeTrainer:
    n = num_layers_of(package)
    cuts = {d: device_cut(cfg.topology, d, n) for d in devices}
    return EdgeTrainer(edge, package, cfg.peft, cfg.training, cuts, cfg.links.end_edge, torch_device)


def device_trainer(cfg: Config, device: str, package, torch_device: str = "cpu") -> DeviceTrainer:
    """A device with its own private examples (it derives them itself; they are never sent)."""
    return device_trainers(cfg, [device], package, torch_device)[device]


def device_trainers(cfg: Config, devices: list[str], package, torch_device: str = "cpu",
                    share_model: bool = False) -> dict[str, DeviceTrainer]:
    """Logical devices, each with its own private examples (derived here from the data config,
    never sent). ``share_model``: one tier model per cut for all of them (a pool worker)."""
    all_ids = [d for ds in devices_by_edge(cfg.topology).values() for d in ds]
    examples = device_examples(cfg.data, all_ids)
    n = num_layers_of(package)
    shared: dict = {}
    out = {}
    for d in devices:
        cut = None if cfg.training.scheme == "fl" else device_cut(cfg.topology, d, n)
        key = None if cut is None else tuple(sorted(cut.device_layers(n)))
        split = shared.get(key) if share_model else None
        out[d] = DeviceTrainer(d, package, cfg.peft, cfg.training, examples[d], cfg.model.max_seq_len, cut,
                               device_seed(cfg, d), torch_device, split=split)
        if share_model:
            shared.setdefault(key, out[d].split)
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
        self.cfg = cfg
        self.cloud = CloudCore(cfg, run_dir)
        package = self.cloud.package
        self.by_edge = devices_by_edge(cfg.topology)
        self.edges = {e: edge_trainer(cfg, e, ds, package) for e, ds in self.by_edge.items()}
        self.devices = {d: device_trainer(cfg, d, package) for ds in self.by_edge.values() for d in ds}
        self.knowledge: StateDict = self.cloud.initial_knowledge()

    def edge_round(self, edge: str, round_idx: int | None = None) -> EdgeUpdate:
        trainer = self.edges[edge]
        chosen = participants(self.cfg, edge, self.by_edge[edge], round_idx)
        clusters = plan_clusters(self.cfg, edge, {d: self.devices[d].num_samples for d in chosen})
        trainer.begin_round(self.knowledge, clusters)
        last = {}
        for cid, members in clusters.items():
            previous = None
            for d in members:
                adapter = trainer.begin_turn(cid, d, previous)
                previous = self.devices[d].train_turn(adapter, DirectEdgeLink(trainer, cid, d), cid,
                                                      self.cfg.training.local_steps, round_idx)
            last[cid] = previous
        return trainer.finish_round(last)

    def run_round(self, round_idx: int) -> dict:
        updates = [self.edge_round(e, round_idx) for e in self.by_edge]
        self.knowledge, metrics = self.cloud.aggregate_round(round_idx, updates)
        if "relay" in metrics:  # relay down: the next round runs on the new base everywhere
            state = self.cloud.package.state_dict
            metrics["relay"]["bytes_down"] = relay_down_bytes(
                {**{e: t.update_base(state) for e, t in self.edges.items()},
                 **{d: t.update_base(state) for d, t in self.devices.items()}})
        return metrics
