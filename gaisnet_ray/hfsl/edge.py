"""The edge side of a round: the middle segment for each cluster, and edge aggregation.

Each cluster trains its own copy of the edge's adapter while sharing the frozen middle blocks
(deep copy with the frozen parameters in the memo), so clusters proceed independently. Inside a
cluster the device-side adapter keys are relayed from member to member through the edge.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import LinkConfig, PeftConfig, TrainingConfig
from ..knowledge.aggregate import aggregator_of
from ..models.cuts import Cut, ModelPart
from ..privacy.secround import EdgeSecAgg, KeyOffer
from .linkcodec import LinkCodec
from .linkmodel import clusters_comm_s
from .messages import EdgeUpdate, LinkUsage, StateDict, TurnResult

# The model code (peft, transformers) loads only in an edge that runs blocks (none under FL, where the
# edge only averages its devices' adapters), and escalation learning's only where it is on.
if TYPE_CHECKING:
    from ..models.split import SplitModel


@dataclass
class _ClusterState:
    members: list[str]
    split: SplitModel | None  # the cluster's copy of the middle segment (None under FL)
    optimizer: torch.optim.Optimizer | None
    knowledge: StateDict  # the cluster's whole adapter, kept current as members finish
    turns: list[TurnResult] = field(default_factory=list)
    pending: dict[str, tuple] = field(default_factory=dict)  # device -> (x, y, lengths kept on the wire)
    active: str | None = None  # the member whose turn runs now; others' split calls are refused
    snapshot: StateDict | None = None  # the middle adapter before the active turn (restored on a drop)
    dropped: dict[str, str] = field(default_factory=dict)  # member -> why it sat out


class EdgeTrainer:
    def __init__(self, edge_id: str, package, part: ModelPart, peft_cfg: PeftConfig, training: TrainingConfig,
                 device_cuts: dict[str, Cut | None], link: LinkConfig, torch_device: str = "cpu",
                 report_devices: bool = False, codec: LinkCodec | None = None,
                 learned_dir: Path | None = None, learned_share: float = 0.0, forward_only: bool = False):
        """``part``: the blocks this edge runs, as its scheme decides (``factory.edge_part_of``;
        none when devices train the whole model). ``device_cuts``: each served device's cut (None:
        it trains the whole model, with no split step here). ``report_devices`` (the ``local``
        baseline): the update also carries each device's own adapter, for the cloud to evaluate.
        ``codec``: how hidden states, gradients and adapters go on the wire (``links.codec``).
        ``forward_only`` (``privacy.send_gradients: false``): devices send no gradients; the blocks run
        frozen, without autograd, and ``backward`` is refused."""
        self.forward_only = forward_only
        self.codec = codec or LinkCodec()
        self.report_devices = report_devices
        # serve.learn_from_escalations under `gaisnet run --serve`: the edge's serving replica writes
        # what it distilled from its escalations into this private folder on the edge's node; each
        # round's aggregation takes it as one more input (``_escalations``), at most this share
        self.learned_dir, self.learned_share = learned_dir, learned_share
        self.edge_id = edge_id
        self.training = training
        self.device_cuts = device_cuts
        self.link = link
        self.torch_device = torch_device
        self.num_layers = package.num_layers
        self.part = part
        self.aggregator = aggregator_of(training)
        self.split = None
        if self.part.layers:  # ``package`` holds at least this part; only the part is built
            from ..models.split import build_tier_model

            self.split = build_tier_model(package, peft_cfg, self.part, torch_device=torch_device)
        self._global: StateDict = {}
        self._clusters: dict[str, _ClusterState] = {}
        self._round_started = 0.0
        self._compute_s = 0.0
        self._secagg: EdgeSecAgg | None = None  # this round's secure aggregation (privacy.secure_aggregation)

    def update_base(self, base) -> int:
        """Relay down: the new foundation weights of the middle blocks this edge runs, as its part
        (a ``FoundationPackage`` holding exactly ``self.part``) or a whole state dict (none under
        FL, where devices hold the whole model). Returns the bytes written."""
        if self.split is None:
            return 0
        from ..models.adapters import load_base_state

        return load_base_state(self.split.peft, base)

    # -------------------------------------------------------------------------------- round
    def begin_round(self, global_knowledge: StateDict, clusters: dict[str, list[str]]) -> None:
        """Pull the global knowledge down and give every cluster a fresh copy of the middle."""
        self._round_started = time.perf_counter()
        self._compute_s = 0.0
        self._global = global_knowledge = self.codec.decode_adapter(global_knowledge)  # bf16 on the wire
        self._clusters = {}
        self._secagg = None
        for cid, members in clusters.items():
            unknown = [m for m in members if m not in self.device_cuts]
            if unknown:
                raise ValueError(f"{self.edge_id}: cluster {cid} names devices it does not serve: {unknown}")
            split, opt = None, None
            if self.split is not None:
                from ..models.adapters import load_adapter_state
                from ..models.split import SplitModel

                frozen = {id(p): p for p in self.split.peft.parameters() if not p.requires_grad}
                split = SplitModel(copy.deepcopy(self.split.peft, memo=frozen))
                load_adapter_state(split.peft, global_knowledge)
                opt = self._middle_optimizer(split)
            self._clusters[cid] = _ClusterState(list(members), split, opt, dict(global_knowledge))

    def _middle_optimizer(self, split) -> torch.optim.Optimizer | None:
        """The optimizer of a cluster's middle adapter; None under ``training.edge_lr: 0``, where the
        adapter is frozen (no gradients kept for it) and the blocks only pass gradients back."""
        from ..models.adapters import trainable_parameters

        params = trainable_parameters(split.peft)
        lr = self.training.lr if self.training.edge_lr is None else self.training.edge_lr
        if lr == 0 or self.forward_only:
            for p in params:
                p.requires_grad_(False)
            return None
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.training.weight_decay)

    def _absorb(self, st: _ClusterState, turn: TurnResult) -> None:
        """Fold a finished member's device-side keys into the cluster's knowledge (and middle)."""
        adapter = self.codec.decode_adapter(turn.adapter)  # bf16 on the wire when a codec is on
        if st.split is not None:
            from ..models.adapters import adapter_state, load_adapter_state

            st.knowledge.update(adapter_state(st.split.peft))
            load_adapter_state(st.split.peft, adapter)
        st.knowledge.update(adapter)
        st.turns.append(turn)

    def add_devices(self, device_cuts: dict[str, Cut | None]) -> None:
        """Serve more devices from the next round on (an edge that died had them). Their cuts must
        need no block this edge pruned."""
        if self.split is not None:
            held = self.split.held_layers()
            for d, cut in device_cuts.items():
                if not cut.edge_layers() <= held:
                    raise ValueError(f"{self.edge_id} cannot take {d}: its cut needs blocks "
                                     f"{sorted(cut.edge_layers() - held)} this edge does not hold")
        self.device_cuts.update(device_cuts)

    def begin_turn(self, cluster_id: str, device_id: str, previous: TurnResult | None) -> StateDict:
        """The adapter keys ``device_id`` trains this turn, after absorbing the previous member."""
        st = self._clusters[cluster_id]
        if previous is not None:
            self._absorb(st, previous)
        st.active = device_id
        if st.split is not None:
            from ..models.adapters import adapter_state

            st.snapshot = adapter_state(st.split.peft)
            st.knowledge.update(st.snapshot)
        if self.split is None:  # FL: the device holds and trains the whole adapter
            return self.codec.encode_adapter(dict(st.knowledge))
        from ..models.split import select_keys

        layers = self.device_cuts[device_id].device_layers(self.num_layers)
        return self.codec.encode_adapter(select_keys(st.knowledge, layers, include_unlayered=True))

    def drop_turn(self, cluster_id: str, device_id: str, reason: str) -> None:
        """``device_id`` died or timed out during its turn: undo what its turn did to the middle
        adapter, so the cluster goes on from the last member that finished, as if it had not run."""
        st = self._clusters.get(cluster_id)
        if st is None:
            return
        st.dropped[device_id] = reason
        st.pending.pop(device_id, None)
        if st.active == device_id:
            if st.split is not None and st.snapshot is not None:
                from ..models.adapters import load_adapter_state

                load_adapter_state(st.split.peft, st.snapshot, strict=True)
                st.optimizer = self._middle_optimizer(st.split)
            st.active = None

    def _cluster_for(self, cluster_id: str, device_id: str) -> _ClusterState:
        st = self._clusters.get(cluster_id)
        if st is None or st.active != device_id:
            raise RuntimeError(f"{self.edge_id}: {device_id} has no running turn in cluster {cluster_id} "
                               "(dropped, or the round ended)")
        return st

    # ------------------------------------------------------------------ secure aggregation
    def secagg_begin(self, offers: list[KeyOffer], threshold: int) -> list[KeyOffer]:
        """This round's members advertised their public keys: keep the roster, relay it back."""
        self._secagg = EdgeSecAgg(self.edge_id, offers, threshold)
        return list(self._secagg.offers.values())

    def secagg_route(self, sealed: dict[str, dict[int, bytes]]) -> dict[str, dict[int, bytes]]:
        """Relay each member's sealed shares to their recipients (the edge cannot open them)."""
        return self._secagg.route(sealed)

    # --------------------------------------------------------------------------- split step
    def _reply(self, t: torch.Tensor, lengths: torch.Tensor | None):
        """(B, T, H) back to the device, encoded as the device's message was (dense if it was dense)."""
        t = t.detach().cpu()
        return t if lengths is None else self.codec.encode(t, lengths)

    def forward(self, cluster_id: str, device_id: str, hidden):
        """h_k (B, T, H) from the device -> h_m (B, T, H) back to it; keeps the graph for backward.
        Both as ``links.codec`` puts them on the wire (``hfsl.linkcodec``)."""
        t0 = time.perf_counter()
        st = self._cluster_for(cluster_id, device_id)
        cut = self.device_cuts[device_id]
        lengths = self.codec.lengths_of(hidden)
        x = self.codec.decode(hidden).to(self.torch_device)
        st.split.peft.train()
        if self.forward_only:  # no gradient will come back: no graph to keep
            with torch.no_grad():
                y = st.split.blocks(x, cut.front_end, cut.back_start)
        else:
            x = x.requires_grad_()
            y = st.split.blocks(x, cut.front_end, cut.back_start)
            st.pending[device_id] = (x, y, lengths)
        self._compute_s += time.perf_counter() - t0
        return self._reply(y, lengths)

    def backward(self, cluster_id: str, device_id: str, grad):
        """dL/dh_m from the device -> dL/dh_k back to it; steps the cluster's middle adapter."""
        t0 = time.perf_counter()
        st = self._cluster_for(cluster_id, device_id)
        if self.forward_only:
            raise RuntimeError(f"{self.edge_id}: {device_id} sent a gradient, but devices send none here "
                               "(privacy.send_gradients is false)")
        if device_id not in st.pending:
            raise RuntimeError(f"{self.edge_id}: backward from {device_id} without a forward")
        x, y, lengths = st.pending.pop(device_id)
        y.backward(self.codec.decode(grad).to(self.torch_device))
        if st.optimizer is not None:  # None: training.edge_lr 0, the middle is frozen
            st.optimizer.step()
            st.optimizer.zero_grad(set_to_none=True)
        self._compute_s += time.perf_counter() - t0
        return self._reply(x.grad, lengths)

    # -------------------------------------------------------------------------- aggregation
    def _escalations(self, round_weight: float) -> dict | None:
        """What the edge's serving replica learned from its escalations, as an aggregation input:
        this round's starting knowledge plus the learned delta (LoRA B), weighted one per escalation
        and at most ``learned_share`` of the round; None when there is nothing (off, none yet). The
        prompts themselves never reach here: only the delta the replica wrote on this node."""
        if self.learned_share <= 0:
            return None
        from ..inference.learn import escalation_weight, fold_delta, load_learned

        found = load_learned(self.learned_dir)
        if found is None:
            return None
        delta, meta = found
        weight = escalation_weight(int(meta.get("records", 0)), round_weight, self.learned_share)
        if weight <= 0:
            return None
        return {"adapter": fold_delta(self._global, delta), "weight": weight, "records": int(meta["records"]),
                "knowledge_version": meta.get("knowledge_version"), "loss_after": meta.get("loss_after")}

    def finish_round(self, last_turns: dict[str, TurnResult | None], secagg_replies: list | None = None) -> EdgeUpdate:
        """Close every cluster with its last member's result and aggregate the clusters, weighted
        by their members' samples, into the edge's update. (Under FL every cluster is one device.)
        Under secure aggregation the turns hold masked vectors and ``secagg_replies`` the
        survivors' unmasking shares: the edge computes the same weighted mean without any one adapter.
        """
        unknown = sorted(set(last_turns) - set(self._clusters))
        if unknown:
            raise ValueError(f"{self.edge_id}: results for clusters it does not run: {unknown}")
        for cid, turn in last_turns.items():
            if turn is not None:  # None: the cluster's last finished turn was absorbed already
                self._absorb(self._clusters[cid], turn)
        # a cluster where every member dropped has nothing to give: it is left out, and the
        # sample weights below renormalize over the turns that finished
        included = [cid for cid, st in self._clusters.items() if st.turns]
        if not included:
            raise ValueError(f"{self.edge_id}: no device finished a turn this round")
        states = [self._clusters[cid] for cid in included]
        dropped = {d: why for st in self._clusters.values() for d, why in st.dropped.items()}
        weights = [sum(t.num_samples for t in st.turns) for st in states]
        secure, escalations = None, None  # escalations: not folded under secure aggregation (sums only)
        if any(t.masked is not None for st in states for t in st.turns):
            if self._secagg is None:
                raise ValueError(f"{self.edge_id}: masked updates, but no key exchange this round")
            knowledge, secure = self._secagg.mean({t.device_id: t.masked for st in states for t in st.turns},
                                                  list(secagg_replies or []), reference=self._global)
        else:
            inputs, in_weights, sources = ([st.knowledge for st in states], list(weights),
                                           [f"{self.edge_id}/{cid}" for cid in included])
            escalations = self._escalations(sum(weights))
            if escalations is not None:
                inputs.append(escalations.pop("adapter"))
                in_weights.append(escalations["weight"])
                sources.append(f"{self.edge_id}/escalations")
            knowledge = self.aggregator(inputs, in_weights, reference=self._global, sources=sources)
        turns = [t for st in states for t in st.turns]
        usage = LinkUsage()
        for t in turns:
            usage = usage.add(t.link)
        update = EdgeUpdate(
            edge_id=self.edge_id,
            adapter=self.codec.encode_adapter(knowledge),  # bf16 on the wire when a codec is on
            num_samples=int(sum(weights)),
            clusters=[[t.device_id for t in st.turns] for st in states],
            device_samples={t.device_id: t.num_samples for t in turns},
            losses=[x for t in turns for x in t.losses],
            end_edge=usage,
            modeled_comm_s=clusters_comm_s([[t.link for t in st.turns] for st in states], self.link),
            wall_s=time.perf_counter() - self._round_started,
            edge_compute_s=self._compute_s,
            dropped=dropped,
            secure_aggregation=secure,
            device_adapters={t.device_id: t.adapter for t in turns} if self.report_devices else {},  # as sent
            escalations=escalations,
        )
        self._clusters = {}
        return update
