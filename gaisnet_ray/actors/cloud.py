"""CloudNode: the cloud as a Ray actor, a thin shell over ``hfsl.cloud.CloudCore``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import ray

from ..config import Config
from ..worker_setup import setup_tier_worker
from .audited import AuditedNode, crosses_boundary

if TYPE_CHECKING:  # torch-free at import: the driver imports this module, only the actor needs torch
    from ..hfsl.messages import EdgeUpdate, StateDict
    from ..models.build import FoundationPackage
    from ..models.cuts import ModelPart


@ray.remote
class CloudNode(AuditedNode):
    def __init__(self, cfg: Config, run_dir: str, resume_round: int | None = None, serving: bool = True):
        from ..hfsl.audit import MessageAudit
        from ..hfsl.cloud import CloudCore

        torch_device = setup_tier_worker(cfg, "cloud")
        self._audit = MessageAudit("cloud", cfg.run.audit_messages)
        peers = None
        if cfg.cloud.workers > 1:
            from .cloudworld import RayCloudPeers

            peers = RayCloudPeers(cfg, run_dir)  # ranks 1.. of the cloud's DeepSpeed world
        # routing is calibrated every round only when something serves every round's versions
        self.core = CloudCore(cfg, run_dir, torch_device, peers, resume_round, calibrate_every_round=serving)

    @crosses_boundary
    def foundation(self, part: ModelPart | None = None) -> FoundationPackage:
        """The current base, or only ``part`` of it (what one kind of tier holds)."""
        return self.core.package if part is None else self.core.package.cut(part)

    def num_layers(self) -> int:
        """Blocks of the foundation model (for the driver's cut of it into tier parts)."""
        return self.core.package.num_layers

    @crosses_boundary
    def initial_knowledge(self) -> StateDict:
        return self.core.initial_knowledge()

    @crosses_boundary
    def aggregate_round(self, round_idx: int, *updates: EdgeUpdate) -> tuple[StateDict, dict]:
        """Call with ``.options(num_returns=2)``: (knowledge, metrics) as two objects."""
        return self.core.aggregate_round(round_idx, list(updates))

    @crosses_boundary
    def evaluate(self) -> dict:
        return self.core.evaluate()

    def peer_reports(self) -> list:
        """What the peer ranks returned from each job (their losses), for logs and tests."""
        return self.core.peer_reports
