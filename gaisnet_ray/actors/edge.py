"""EdgeNode: an edge server as a Ray actor, a thin shell over ``hfsl.edge.EdgeTrainer``.

A plain (synchronous) actor: it runs one call at a time, each caller's calls in the order that
caller submitted them (Ray's actor ordering). The driver submits a cluster's next ``begin_turn``
only once the previous member's turn is done (and passes the ``begin_round`` result into it), so a
queued call never waits on a slow member; the devices' ``forward`` / ``backward`` calls come from
other callers and interleave with the driver's, so clusters proceed independently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from ..config import Config
from ..worker_setup import setup_tier_worker
from .audited import BaseHolderNode, crosses_boundary, fetch_deferred

if TYPE_CHECKING:  # torch-free at import: the driver imports this module, only the actor needs torch
    from ..hfsl.messages import EdgeUpdate, StateDict, TurnResult


@ray.remote
class EdgeNode(BaseHolderNode):
    def __init__(self, edge_id: str, cfg: Config, devices: list[str], package, run_dir: str | None = None):
        """``package``: the edge's part of the foundation (its middle blocks), built and then dropped.
        ``run_dir``: the run folder (the edge's private area there holds what serving learned).
        ``package`` may be ``audited.deferred(ref)``: fetched here, after the imports."""
        from ..hfsl.audit import MessageAudit
        from ..hfsl.factory import edge_trainer

        torch_device = setup_tier_worker(cfg, "edge")
        package = fetch_deferred(package)
        self._audit = MessageAudit(edge_id, cfg.run.audit_messages)
        self._audit.record("__init__", "in", {"devices": devices, "package": package})
        self.core = edge_trainer(cfg, edge_id, devices, package, torch_device, run_dir=run_dir)
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
    def finish_round(self, cluster_ids: list[str], *args) -> tuple[EdgeUpdate, dict]:
        """Call with ``.options(num_returns=2)``: the update, and a small status the driver reads.
        ``args``: each cluster's last turn (or None), then the survivors' unmasking replies under
        secure aggregation (refs in ``args`` are resolved by Ray; nested ones would not be)."""
        n = len(cluster_ids)
        update = self.core.finish_round(dict(zip(cluster_ids, args[:n])), list(args[n:]) or None)
        return update, {"edge": update.edge_id, "num_samples": update.num_samples, "dropped": update.dropped}

    @crosses_boundary
    def secagg_begin(self, offers: list, threshold: int) -> list:
        """Secure aggregation: keep this round's roster of public keys and relay it."""
        return self.core.secagg_begin(offers, threshold)

    @crosses_boundary
    def secagg_route(self, sealed: dict) -> dict:
        """Secure aggregation: relay each member's sealed shares to their recipients."""
        return self.core.secagg_route(sealed)

    @crosses_boundary
    def drop_turn(self, cluster_id: str, device_id: str, reason: str) -> None:
        self.core.drop_turn(cluster_id, device_id, reason)

    @crosses_boundary
    def add_devices(self, device_ids: list[str]) -> None:
        """Take over devices of an edge that died (from the next round on)."""
        from ..hfsl.factory import edge_cuts

        self.core.add_devices(edge_cuts(self._cfg, device_ids, self._num_layers))
