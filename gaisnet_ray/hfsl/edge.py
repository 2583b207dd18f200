"""The edge side of a round: the middle segment for each cluster, and edge aggregation.

Each cluster trains its own copy of the edge's adapter while sharing the frozen middle blocks
(deep copy with the frozen parameters in the memo), so clusters proceed independently. Inside a
cluster the device-side adapter keys are relayed from member to member through the edge.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..config import LinkConfig, PeftConfig, TrainingConfig
from ..knowledge.aggregate import aggregate
from ..models.adapters import adapter_state, load_adapter_state, load_base_state, trainable_parameters
from ..models.split import Cut, SplitModel, build_tier_model, select_keys
from .linkmodel import clusters_comm_s
from .messages import EdgeUpdate, LinkUsage, StateDict, TurnResult


@dataclass
class _ClusterState:
    members: list[str]
    split: SplitModel | None  # the cluster's copy of the middle segment (None under FL)
    optimizer: torch.optim.Optimizer | None
    knowledge: StateDict  # the cluster's whole adapter, kept current as members finish
    turns: list[TurnResult] = field(default_factory=list)
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class EdgeTrainer:
    def __init__(self, edge_id: str, package, peft_cfg: PeftConfig, training: TrainingConfig,
                 device_cuts: dict[str, Cut], link: LinkConfig, torch_device: str = "cpu"):
        self.edge_id = edge_id
        self.training = training
        self.device_cuts = device_cuts
        self.link = link
        self.torch_device = torch_device
        self.num_layers = package.config.get("n_layer", package.config.get("num_hidden_layers"))
        split_scheme = training.scheme != "fl"
        layers = set().union(*(c.edge_layers() for c in device_cuts.values())) if split_scheme else set()
        self.split = None
        if layers:
            self.split = build_tier_model(package, peft_cfg, keep_layers=layers, keep_embeddings=False,
                                          keep_head=False, torch_device=torch_device)
        self._global: StateDict = {}
        self._clusters: dict[str, _ClusterState] = {}
        self._round_started = 0.0
        self._compute_s = 0.0

    def update_base(self, base_state: StateDict) -> int:
        """Relay down: the new foundation weights for the middle blocks this edge runs (none under
        FL, where devices hold the whole model). Returns the bytes written."""
        return load_base_state(self.split.peft, base_state) if self.split is not None else 0

    # -------------------------------------------------------------------------------- round
    def begin_round(self, global_knowledge: StateDict, clusters: dict[str, list[str]]) -> None:
        """Pull the global knowledge down and give every cluster a fresh copy of the middle."""
        self._round_started = time.perf_counter()
        self._compute_s = 0.0
        self._global = global_knowledge
        self._clusters = {}
        for cid, members in clusters.items():
            unknown = [m for m in members if m not in self.device_cuts]
            if unknown:
                raise ValueError(f"{self.edge_id}: cluster {cid} names devices it does not serve: {unknown}")
            split, opt = None, None
            if self.split is not None:
                frozen = {id(p): p for p in self.split.peft.parameters() if not p.requires_grad}
                split = SplitModel(copy.deepcopy(self.split.peft, memo=frozen))
                load_adapter_state(split.peft, global_knowledge)
                opt = torch.optim.AdamW(trainable_parameters(split.peft), lr=self.training.lr,
                                        weight_decay=self.training.weight_decay)
            self._clusters[cid] = _ClusterState(list(members), split, opt, dict(global_knowledge))

    def _absorb(self, st: _ClusterState, turn: TurnResult) -> None:
        """Fold a finished member's device-side keys into the cluster's knowledge (and middle)."""
        if st.split is not None:
            st.knowledge.update(adapter_state(st.split.peft))
            load_adapter_state(st.split.peft, turn.adapter)
        st.knowledge.update(turn.adapter)
        st.turns.append(turn)

    def begin_turn(self, cluster_id: str, device_id: str, previous: TurnResult | None) -> StateDict:
        """The adapter keys ``device_id`` trains this turn, after absorbing the previous member."""
        st = self._clusters[cluster_id]
        if previous is not None:
            self._absorb(st, previous)
        if st.split is not None:
            st.knowledge.update(adapter_state(st.split.peft))
        if self.split is None:  # FL: the device holds and trains the whole adapter
            return dict(st.knowledge)
        layers = self.device_cuts[device_id].device_layers(self.num_layers)
        return select_keys(st.knowledge, layers, include_unlayered=True)

    # --------------------------------------------------------------------------- split step
    def forward(self, cluster_id: str, device_id: str, hidden: torch.Tensor) -> torch.Tensor:
        """h_k (B, T, H) from the device -> h_m (B, T, H) back to it; keeps the graph for backward."""
        t0 = time.perf_counter()
        st = self._clusters[cluster_id]
        cut = self.device_cuts[device_id]
        x = hidden.to(self.torch_device).requires_grad_()
        st.split.peft.train()
        y = st.split.blocks(x, cut.front_end, cut.back_start)
        st.pending[device_id] = (x, y)
        self._compute_s += time.perf_counter() - t0
        return y.detach().cpu()

    def backward(self, cluster_id: str, device_id: str, grad: torch.Tensor) -> torch.Tensor:
        """dL/dh_m from the device -> dL/dh_k back to it; steps the cluster's middle adapter."""
        t0 = time.perf_counter()
        st = self._clusters[cluster_id]
        if device_id not in st.pending:
            raise RuntimeError(f"{self.edge_id}: backward from {device_id} without a forward")
        x, y = st.pending.pop(device_id)
        y.backward(grad.to(self.torch_device))
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        self._compute_s += time.perf_counter() - t0
        return x.grad.detach().cpu()

    # -------------------------------------------------------------------------- aggregation
    def finish_round(self, last_turns: dict[str, TurnResult]) -> EdgeUpdate:
        """Close every cluster with its last member's result and aggregate the clusters, weighted
        by their members' samples, into the edge's update. (Under FL every cluster is one device.)
        """
        for cid, st in self._clusters.items():
            if cid not in last_turns:
                raise ValueError(f"{self.edge_id}: no result for cluster {cid}")
            self._absorb(st, last_turns[cid])
        states = list(self._clusters.values())
        weights = [sum(t.num_samples for t in st.turns) for st in states]
        knowledge = aggregate(
            self.training.aggregation, [st.knowledge for st in states], weights, reference=self._global,
            trim_ratio=self.training.trim_ratio, clip_norm=self.training.clip_norm,
            sources=[f"{self.edge_id}/{cid}" for cid in self._clusters],
        )
        turns = [t for st in states for t in st.turns]
        usage = LinkUsage()
        for t in turns:
            usage = usage.add(t.link)
        update = EdgeUpdate(
            edge_id=self.edge_id,
            adapter=knowledge,
            num_samples=int(sum(weights)),
            clusters=[list(st.members) for st in states],
            device_samples={t.device_id: t.num_samples for t in turns},
            losses=[x for t in turns for x in t.losses],
            end_edge=usage,
            modeled_comm_s=clusters_comm_s([[t.link for t in st.turns] for st in states], self.link),
            wall_s=time.perf_counter() - self._round_started,
            edge_compute_s=self._compute_s,
        )
        self._clusters = {}
        return update
