"""The planner in a run: plan before the actors start, record the plan in the run folder, and put
the modeled round next to the measured one every round (``driver`` and ``inprocess``).

With ``topology.planner: fixed`` and no emulation the run trains exactly as without a planner;
the plan is still recorded and each round's modeled time computed, for the comparison.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import Config
from ..layout import PLAN_NAME, RunLayout
from ..schemes import scheme_of
from .cost import RoundShape, cloud_overhead_s, edge_overhead_s, turn_seconds, turn_terms
from .emulation import DeviceEmulation
from .planning import RoundPlan, apply_plan, plan_round
from .profiles import Fleet, build_fleet

log = logging.getLogger(__name__)

UNLIMITED = 1e18  # bits/s of a link that costs nothing (local dev mode without emulation)


@dataclass
class RunPlan:
    plan: RoundPlan
    shape: RoundShape
    fleet: Fleet  # the devices as profiled (what the plan is for)
    executed: Fleet  # the devices as they run here: profiles when emulated, else the host throughout
    host_gflops: float
    how: str
    emulate: bool
    planned: bool  # the runtime follows the plan's clusters (topology.planner not fixed)

    def trains(self, device: str) -> bool:
        return device not in self.plan.excluded

    def clusters_of(self, edge: str) -> list[list[str]] | None:
        return self.plan.clusters.get(edge, []) if self.planned else None

    def shares(self, edge: str, clusters: dict[str, list[str]]) -> dict[str, float]:
        """Each of this round's clusters' share of the edge's link: its planned cluster's share among
        the planned clusters that run (equal shares without a plan)."""
        planned = self.plan.clusters.get(edge, []) if self.planned else []
        where = {d: i for i, c in enumerate(planned) for d in c}
        idx = {cid: where.get(members[0]) if members else None for cid, members in clusters.items()}
        if not planned or any(i is None for i in idx.values()):
            return {cid: 1.0 / len(clusters) for cid in clusters}
        raw = {cid: self.plan.shares[edge][i] for cid, i in idx.items()}
        total = sum(raw.values())
        return {cid: v / total for cid, v in raw.items()}

    def emulation(self, edge: str, clusters: dict[str, list[str]], cid: str, device: str) -> DeviceEmulation | None:
        """How ``device``'s turn is emulated this round (None: not emulating)."""
        if not self.emulate:
            return None
        d, e = self.fleet.device(device), self.fleet.edge(edge)
        x = self.shares(edge, clusters)[cid] * e.bandwidth_bps
        cut = self.plan.cuts.get(device)
        blocks = sum(cut) if cut else self.shape.min_device_blocks
        compute = self.shape.steps * self.shape.device_flops(blocks) / d.flops
        return DeviceEmulation(compute, min(d.up_bps, x), min(d.down_bps, x), d.latency_s,
                               self.fleet.host_flops / d.flops)

    def modeled_round_s(self, plans: dict[str, dict[str, list[str]]]) -> float:
        """The cost model's round for the clusters this round actually ran (``plans``: edge ->
        cluster id -> members), on the fleet as it runs here."""
        worst = 0.0
        for e, clusters in plans.items():
            edge = self.executed.edge(e)
            k = len(clusters)
            slowest = 0.0
            shares = self.shares(e, clusters)
            for cid, members in clusters.items():
                share = shares[cid]
                t = 0.0
                for m in members:
                    dev = self.executed.device(m)
                    c = self.plan.cuts.get(m)
                    blocks = sum(c) if c else 2
                    t += turn_seconds(turn_terms(self.shape, dev, edge, blocks, k), dev, edge, share)
                slowest = max(slowest, t)
            worst = max(worst, slowest + edge_overhead_s(self.shape, edge, k))
        return worst + cloud_overhead_s(self.shape, self.executed, len(plans))

    def metrics(self, plans: dict[str, dict[str, list[str]]]) -> dict:
        return {"planner": self.plan.name, "modeled_round_s": self.modeled_round_s(plans),
                "planned_round_s": self.plan.delay_s, "emulated": self.emulate,
                "host_gflops": round(self.host_gflops, 3)}

    def to_dict(self) -> dict:
        return {"planner": self.plan.name, "host_gflops": self.host_gflops, "host_gflops_source": self.how,
                "emulated": self.emulate, "plan": self.plan.to_dict(),
                "fleet": [d.to_dict() for d in self.fleet.devices]}

    def record(self, run_dir: str | Path) -> Path:
        path = RunLayout(run_dir).plan
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _executed_fleet(fleet: Fleet, emulate: bool) -> Fleet:
    """The fleet as it runs in local dev mode: every node at the host's speed and links free, or,
    emulated, devices at their profile's speed (never faster than the host) and links, edges and
    the cloud at the host's speed."""
    host = fleet.host_flops
    edges = tuple(replace(e, flops=host, cloud_bps=UNLIMITED, cloud_latency_s=0.0,
                          bandwidth_bps=e.bandwidth_bps if emulate else UNLIMITED) for e in fleet.edges)
    if emulate:
        devices = tuple(replace(d, flops=min(d.flops, host)) for d in fleet.devices)
    else:
        devices = tuple(replace(d, flops=host, up_bps=UNLIMITED, down_bps=UNLIMITED, latency_s=0.0)
                        for d in fleet.devices)
    return Fleet(devices, edges, host, host)


def recorded_host_gflops(run_dir: str | Path) -> float | None:
    """The host speed an earlier start of this run planned with (its ``plan.json``), so a resumed run
    plans exactly as the run it continues instead of recalibrating on a host that may be busier."""
    try:
        return float(json.loads(RunLayout(run_dir).plan.read_text())["host_gflops"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_run(cfg: Config, model_config: dict | None = None,
                sample_counts: dict[str, int] | None = None,
                run_dir: str | Path | None = None) -> tuple[Config, RunPlan | None]:
    """Plan ``cfg``'s round: (the config the runtime runs, with the plan's cuts; the run plan).
    Under FL (no cut) nothing is planned: (cfg, None). With ``run_dir`` holding a ``plan.json``
    (a resumed run) the host speed recorded there is reused, so the plan is the same."""
    if not scheme_of(cfg).splits:
        if cfg.topology.planner != "fixed" or cfg.planner.emulate:
            log.warning("training.scheme '%s' has no cut to plan: topology.planner and planner.emulate are ignored",
                        cfg.training.scheme)
        return cfg, None
    from ..hfsl.memory import model_config_of
    from .command import host_gflops

    model_config = model_config if model_config is not None else model_config_of(cfg)
    recorded = recorded_host_gflops(run_dir) if run_dir is not None and not cfg.planner.host_gflops else None
    if recorded:
        gflops, how = recorded, f"recorded in {PLAN_NAME} when this run started"
    else:
        gflops, how = host_gflops(cfg, model_config)
    shape = RoundShape.from_config(cfg, model_config)
    fleet = build_fleet(cfg, gflops)
    plan = plan_round(cfg, shape, fleet, sample_counts)
    planned = cfg.topology.planner != "fixed"
    if plan.excluded:
        for d, why in plan.excluded.items():
            log.warning("device %s is excluded from training: %s", d, why)
    run_cfg = apply_plan(cfg, plan) if planned else cfg
    return run_cfg, RunPlan(plan, shape, fleet, _executed_fleet(fleet, cfg.planner.emulate), gflops, how,
                            cfg.planner.emulate, planned)
