"""The Ray driver of a GaisNet run: places the tier actors and runs rounds through actor calls.

The driver never touches a tensor: it wires object refs between actors (a cluster's members are a
chain of refs, so they train in turn while clusters and edges run in parallel) and only reads the
small metrics dict each round returns.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError

from .actors import CloudNode, EdgeNode, EndNode, tier_options
from .config import TIER_RESOURCES, Config
from .hfsl.inprocess import relay_down_bytes
from .hfsl.plan import devices_by_edge, plan_clusters


class PlacementError(RuntimeError):
    """Tier actors could not be placed: the cluster lacks the tier resources they ask for."""


class GaisNetDriver:
    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.by_edge = devices_by_edge(cfg.topology)
        self.timeout = cfg.run.actor_timeout_s
        self.cloud = None
        self.edges: dict = {}
        self.devices: dict = {}
        self.knowledge_ref = None
        self.sample_counts: dict[str, int] = {}
        self.initial_eval: dict | None = None

    # ---------------------------------------------------------------------------- placement
    def start(self) -> None:
        """Place 1 cloud, the edges and the end devices by their tier resources, wait until ready."""
        t = self.cfg.topology
        self.cloud = CloudNode.options(**tier_options("cloud", t.cloud)).remote(self.cfg, str(self.run_dir))
        self._wait_ready({"cloud": self.cloud})
        package = self.cloud.foundation.remote()  # one object, pulled by every edge and device
        for e, devices in self.by_edge.items():
            self.edges[e] = EdgeNode.options(**tier_options("edge", t.edge)).remote(e, self.cfg, devices, package)
            for d in devices:
                self.devices[d] = EndNode.options(**tier_options("end", t.end)).remote(d, self.cfg, package)
        self._wait_ready({**self.edges, **self.devices})
        profiles = ray.get([a.profile.remote() for a in self.devices.values()], timeout=self.timeout)
        self.sample_counts = {p["device_id"]: p["num_samples"] for p in profiles}
        self.knowledge_ref = self.cloud.initial_knowledge.remote()
        self.initial_eval = ray.get(self.cloud.evaluate.remote(), timeout=self.timeout)

    def _wait_ready(self, actors: dict) -> None:
        refs = {a.__ray_ready__.remote(): name for name, a in actors.items()}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout)
        ray.get(ready)  # surfaces a constructor error (bad model path, bad data) with its cause
        if pending:
            names = sorted(refs[r] for r in pending)
            raise PlacementError(
                f"{len(names)} actor(s) not placed after {self.timeout:.0f}s: {names[:8]}; they ask for "
                f"tier resources {sorted(TIER_RESOURCES.values())} "
                f"and CPUs/GPUs per topology.*; the cluster has {ray.available_resources()}. "
                f"Check num_cpus/num_gpus per tier and the nodes' declared resources."
            )

    # ------------------------------------------------------------------------------- rounds
    def run_round(self, round_idx: int) -> dict:
        started = time.perf_counter()
        steps = self.cfg.training.local_steps
        updates = []
        for e, devices in self.by_edge.items():
            edge = self.edges[e]
            clusters = plan_clusters(self.cfg, e, {d: self.sample_counts[d] for d in devices})
            round_ready = edge.begin_round.remote(self.knowledge_ref, clusters)
            last = {}
            for cid, members in clusters.items():
                previous = None  # members train in turn: each turn depends on the one before
                for d in members:
                    adapter = edge.begin_turn.remote(cid, d, previous, round_ready)
                    previous = self.devices[d].train_turn.remote(adapter, edge, cid, steps)
                last[cid] = previous
            updates.append(edge.finish_round.remote(list(last), *last.values()))
        knowledge_ref, metrics_ref = self.cloud.aggregate_round.options(num_returns=2).remote(round_idx, *updates)
        try:
            metrics = ray.get(metrics_ref, timeout=self.timeout)
        except GetTimeoutError:
            raise TimeoutError(f"round {round_idx} did not finish within run.actor_timeout_s="
                               f"{self.timeout:.0f}s") from None
        self.knowledge_ref = knowledge_ref
        if "relay" in metrics:
            metrics["relay"]["bytes_down"] = self._relay_down()
        metrics["wall_s"] = time.perf_counter() - started
        return metrics

    def _relay_down(self) -> dict:
        """Send the cloud's new base (one object, pulled by each node) to every edge and device and
        wait until all hold it, so the next round runs on it everywhere."""
        package = self.cloud.foundation.remote()
        nodes = {**self.edges, **self.devices}
        refs = {name: a.update_base.remote(package) for name, a in nodes.items()}
        written = ray.get(list(refs.values()), timeout=self.timeout)
        return relay_down_bytes(dict(zip(refs, written)))

    # ------------------------------------------------------------------------------ closing
    def close(self) -> None:
        actors = [a for a in [self.cloud, *self.edges.values(), *self.devices.values()] if a is not None]
        if self.cfg.run.audit_messages:
            ray.get([a.dump_audit.remote(str(self.run_dir / "audit")) for a in actors], timeout=self.timeout)
        for a in actors:
            ray.kill(a)
