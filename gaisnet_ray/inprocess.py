"""The whole GaisNet cycle in one process, with the same core objects and direct calls.

This is what the Ray runtime does minus Ray: it is the baseline for the overhead benchmark and the
reference the distributed run is checked against (same seeds -> same knowledge).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import Config
from .rounds import BeginEdge, FinishEdge, RoundMetrics, RoundScheduler, StartTurn
from .hfsl.cloud import CloudCore
from .hfsl.edge import EdgeTrainer
from .hfsl.factory import device_trainer, edge_trainer, relay_down_bytes, tier_parts
from .hfsl.messages import StateDict
from .privacy.secround import check_secure_aggregation, direct_exchange, reveal_sets
from .schemes import scheme_of
from .schemes.topology import devices_by_edge


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
        from .planner.command import sample_counts
        from .planner.runtime import prepare_run

        # the planner, as in the Ray driver: the plan's cuts go into the config every tier builds from
        self.cfg, self.run_plan = prepare_run(cfg, sample_counts=sample_counts(cfg), run_dir=run_dir)
        cfg = self.cfg
        check_secure_aggregation(cfg)  # a clear ConfigError where the edge could not unmask
        self._secagg_rosters: dict[str, dict[str, int]] = {}  # edge -> this round's members (device -> index)
        self.cloud = CloudCore(cfg, run_dir)
        package = self.cloud.package
        self.by_edge = devices_by_edge(cfg.topology)
        parts = tier_parts(cfg, package.num_layers)  # each tier gets (and builds) only its part
        self.edges = {e: edge_trainer(cfg, e, ds, package.cut(parts[e]), run_dir=str(run_dir))
                      for e, ds in self.by_edge.items()}
        self.devices = {d: device_trainer(cfg, d, package.cut(parts[d])) for ds in self.by_edge.values() for d in ds}
        self.knowledge: StateDict = self.cloud.initial_knowledge()
        self.steps = scheme_of(cfg).turn_steps(cfg)  # optimizer steps of one device turn
        self.scheduler = RoundScheduler(cfg, self.by_edge, {d: d for d in self.devices},
                                        {d: t.num_samples for d, t in self.devices.items()}, self.run_plan,
                                        deadlines=False)

    def run_round(self, round_idx: int) -> dict:
        """One round through the same ``RoundScheduler`` as the Ray driver (plan, turn order),
        its actions carried out as direct calls: each new action runs before older ones, so an
        edge's clusters run one after another and edges one after another."""
        started = time.perf_counter()
        sched, results, updates = self.scheduler, {}, {}
        actions = sched.begin_round(round_idx)
        while actions:
            a, actions = actions[0], actions[1:]
            new = []
            if isinstance(a, BeginEdge):
                self.edges[a.edge].begin_round(self.knowledge, a.clusters)
                if self.cfg.privacy.secure_aggregation:  # key exchange before any turn
                    self._secagg_rosters[a.edge] = direct_exchange(self.edges[a.edge], self.devices, round_idx,
                                                                   a.clusters)
            elif isinstance(a, StartTurn):
                t, trainer = a.turn, self.edges[a.turn.edge]
                adapter = trainer.begin_turn(t.cluster, t.device, results.pop(a.previous, None))
                results[t] = self.devices[t.device].train_turn(
                    adapter, DirectEdgeLink(trainer, t.cluster, t.device), t.cluster, self.steps,
                    round_idx, sched.emulation(t))
                new = sched.turn_finished(t)
            elif isinstance(a, FinishEdge):
                replies = None
                if self.cfg.privacy.secure_aggregation:  # the survivors reveal what unmasks their sum
                    alive, gone = reveal_sets(self._secagg_rosters[a.edge], [t.device for t in a.last.values() if t])
                    replies = [self.devices[t.device].secagg.reveal(alive, gone) for t in a.last.values() if t]
                updates[a.edge] = self.edges[a.edge].finish_round({c: results.pop(t, None) for c, t in a.last.items()},
                                                                  replies)
                new = sched.edge_delivered(a.edge)
            else:  # drops and restarts come from faults and deadlines, which direct calls do not have
                raise TypeError(f"unexpected scheduler action in one process: {a!r}")
            actions = new + actions
        edges = sched.delivered()
        train_s = time.perf_counter() - started  # edges one after another here, in parallel on Ray
        self.knowledge, cloud_metrics = self.cloud.aggregate_round(round_idx, [updates[e] for e in edges])
        relay_down = None
        if "relay" in cloud_metrics:  # relay down: each edge and device gets its part of the new base
            base = self.cloud.package
            relay_down = relay_down_bytes(
                {**{e: t.update_base(base.cut(t.part)) for e, t in self.edges.items()},
                 **{d: t.update_base(base.cut(t.part)) for d, t in self.devices.items()}})
        return RoundMetrics(cloud=cloud_metrics, relay_down=relay_down, plan=sched.plan_metrics(train_s)).row()
