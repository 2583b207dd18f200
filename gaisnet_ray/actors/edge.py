"""EdgeNode: an edge server as a Ray actor, a thin shell over ``hfsl.edge.EdgeTrainer``.

It runs out of order: calls are ordered by their data dependencies (the driver passes the
``begin_round`` result into every ``begin_turn``), so one cluster waiting on a slow member never
holds back another cluster's calls.
"""

from __future__ import annotations

import ray

from ..config import Config
from ..hfsl.audit import MessageAudit
from ..hfsl.inprocess import edge_trainer
from ..hfsl.plan import device_cut
from ..hfsl.messages import EdgeUpdate, StateDict, TurnResult
from .placement import BaseHolderNode, crosses_boundary, setup_tier_worker


@ray.remote
class EdgeNode(BaseHolderNode):
    def __init__(self, edge_id: str, cfg: Config, devices: list[str], package):
        """``package``: the edge's part of the foundation (its middle blocks), built and then dropped."""
        torch_device = setup_tier_worker(cfg, "edge")
        self._audit = MessageAudit(edge_id, cfg.run.audit_messages)
        self._audit.record("__init__", "in", {"devices": devices, "package": package})
        self.core = edge_trainer(cfg, edge_id, devices, package, torch_device)
        self._cfg, self._num_layers = cfg, package.num_layers  # the package itself is not kept

    @crosses_boundary
    def begin_round(self, knowledge: StateDict, clusters: dict[str, list[str]]) -> bool:
        self.core.begin_round(knowledge, clusters)
        return True

    @crosses_boundary
    def begin_turn(self, cluster_id: str, device_id: str, previous: TurnResult | None, _round_ready: bool) -> StateDict:
        return self.core.begin_turn(cluster_id, device_id, previous)

    @crosses_boundary
    def forward(self, cluster_id: str, device_id: str, hidden):
        return self.core.forward(cluster_id, device_id, hidden)

    @crosses_boundary
    def backward(self, cluster_id: str, device_id: str, grad):
        return self.core.backward(cluster_id, device_id, grad)

    @crosses_boundary
    def finish_round(self, cluster_ids: list[str], *last_turns: TurnResult | None) -> tuple[EdgeUpdate, dict]:
        """Call with ``.options(num_returns=2)``: the update, and a small status the driver reads."""
        update = self.core.finish_round(dict(zip(cluster_ids, last_turns)))
        return update, {"edge": update.edge_id, "num_samples": update.num_samples, "dropped": update.dropped}

    @crosses_boundary
    def drop_turn(self, cluster_id: str, device_id: str, reason: str) -> None:
        self.core.drop_turn(cluster_id, device_id, reason)

    @crosses_boundary
    def add_devices(self, device_ids: list[str]) -> None:
        """Take over devices of an edge that died (from the next round on)."""
        self.core.add_devices({d: device_cut(self._cfg.topology, d, self._num_layers) for d in device_ids})
