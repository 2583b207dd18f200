"""The Ray driver of a GaisNet run: places the tier actors and runs rounds through actor calls.

The driver never touches a tensor: it wires object refs between actors (a cluster's members are a
chain of refs, so they train in turn while clusters and edges run in parallel) and only reads the
small metrics dict each round returns.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from .actors import CloudNode, EdgeNode, EndNode, EndWorker, tier_options
from .config import TIER_RESOURCES, Config
from .hfsl.inprocess import relay_down_bytes, tier_parts
from .hfsl.plan import devices_by_edge, participants, plan_clusters
from .planner.command import sample_counts as planned_sample_counts
from .planner.runtime import prepare_run


log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """Tier actors could not be placed: the cluster lacks the tier resources they ask for."""


def _dead_actor_id(err: BaseException) -> str | None:
    """The id (hex) of the actor whose death caused ``err``, if Ray says so (also through a task
    that failed on a dead actor's result)."""
    for e in (err, getattr(err, "cause", None)):
        if isinstance(e, RayActorError) and getattr(e, "actor_id", None):
            return e.actor_id
    return None


class RoundFailedError(RuntimeError):
    """Too few edges delivered an update for the round to aggregate (``faults.min_edge_updates``)."""


class GaisNetDriver:
    def __init__(self, cfg: Config, run_dir: str | Path, planned: tuple | None = None):
        # the planner (topology.planner, planner.*): the plan's cuts go into the config every tier builds
        # from; ``planned``: what planner.runtime.prepare_run already returned for ``cfg`` (run_job plans
        # before its memory check)
        self.cfg, self.run_plan = planned or prepare_run(cfg, sample_counts=planned_sample_counts(cfg),
                                                         run_dir=run_dir)
        cfg = self.cfg
        self.run_dir = Path(run_dir)
        if self.run_plan is not None:
            self.run_plan.record(self.run_dir)
        self.by_edge = devices_by_edge(cfg.topology)
        self.members = {e: list(ds) for e, ds in self.by_edge.items()}  # changes when an edge is lost
        self.dead_devices: set[str] = set()
        self.dead_edges: set[str] = set()
        self.end_actors: dict = {}  # EndNode per device, or the EndWorker pool (topology.end_workers)
        self.dead_end_actors: set[str] = set()
        self.timeout = cfg.run.actor_timeout_s
        self.cloud = None
        self.edges: dict = {}
        self.devices: dict = {}
        self.knowledge_ref = None
        self.sample_counts: dict[str, int] = {}
        self.initial_eval: dict | None = None
        self.node_parts: dict[str, list] = {}  # edge / end actor -> the parts of the base it holds (ModelPart)

    # ---------------------------------------------------------------------------- placement
    def start(self, resume_round: int | None = None) -> None:
        """Place 1 cloud, the edges and the end devices by their tier resources, wait until ready.
        ``resume_round``: the last round a resumed run has on disk (the cloud starts from it)."""
        t = self.cfg.topology
        self.cloud = CloudNode.options(**tier_options("cloud", t.cloud)).remote(self.cfg, str(self.run_dir),
                                                                               resume_round)
        self._wait_ready({"cloud": self.cloud})
        # each node gets only its part of the base: one object per distinct part, pulled by the nodes
        # that hold it (devices: embeddings, front and back blocks, head; edges: middle blocks)
        parts = tier_parts(self.cfg, ray.get(self.cloud.num_layers.remote(), timeout=self.timeout))
        all_devices = [d for ds in self.by_edge.values() for d in ds]
        self.node_parts = {e: [parts[e]] for e in self.by_edge}
        if t.end_workers:
            workers = {f"end-worker-{w}": all_devices[w::t.end_workers]
                       for w in range(min(t.end_workers, len(all_devices)))}
            self.node_parts.update({name: list(dict.fromkeys(parts[d] for d in hosted))
                                    for name, hosted in workers.items()})
        else:
            self.node_parts.update({d: [parts[d]] for d in all_devices})
        packages = self._part_refs(self.node_parts)
        for e, devices in self.by_edge.items():
            self.edges[e] = EdgeNode.options(**tier_options("edge", t.edge)).remote(
                e, self.cfg, devices, packages[parts[e]])
        if t.end_workers:  # logical devices on a bounded pool, dealt round-robin
            for name, hosted in workers.items():
                self.end_actors[name] = EndWorker.options(**tier_options("end", t.end)).remote(
                    name, self.cfg, hosted, *[packages[p] for p in self.node_parts[name]])
                self.devices.update({d: self.end_actors[name] for d in hosted})
            self._wait_ready({**self.edges, **self.end_actors})
            profiles = [p for ps in ray.get([a.profiles.remote() for a in self.end_actors.values()],
                                            timeout=self.timeout) for p in ps]
        else:
            for d in all_devices:
                self.devices[d] = self.end_actors[d] = EndNode.options(**tier_options("end", t.end)).remote(
                    d, self.cfg, packages[parts[d]])
            self._wait_ready({**self.edges, **self.devices})
            profiles = ray.get([a.profile.remote() for a in self.devices.values()], timeout=self.timeout)
        self.sample_counts = {p["device_id"]: p["num_samples"] for p in profiles}
        self.knowledge_ref = self.cloud.initial_knowledge.remote()
        self.initial_eval = ray.get(self.cloud.evaluate.remote(), timeout=self.timeout)

    def _part_refs(self, node_parts: dict[str, list]) -> dict:
        """One object per distinct part the nodes hold: the cloud cuts it out of its current base."""
        wanted = dict.fromkeys(p for ps in node_parts.values() for p in ps)
        return {p: self.cloud.foundation.remote(p) for p in wanted}

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
        """One round, surviving device and edge failures.

        Each cluster's members train in turn: the driver starts a member's turn when the previous
        one finished (its result goes to the edge by reference, never through the driver). A member
        whose actor died, whose turn raised, or who ran past ``faults.turn_timeout_s`` sits the round
        out: the edge undoes its partial turn and the next member goes on from the last one that
        finished. An edge that dies takes its clusters out of the round. The cloud aggregates the
        edges that delivered, weighted by the samples that were actually trained on.
        """
        started = time.perf_counter()
        cfg = self.cfg
        steps, timeout_s = cfg.training.local_steps, cfg.faults.turn_timeout_s or self.timeout
        plans = {}
        for e, devices in self.members.items():
            live = participants(cfg, e, [d for d in devices if d not in self.dead_devices and self._trains(d)],
                                round_idx)
            if e not in self.dead_edges and live:
                plans[e] = plan_clusters(cfg, e, {d: self.sample_counts[d] for d in live},
                                         self.run_plan.clusters_of(e) if self.run_plan else None)
        ready = {e: self.edges[e].begin_round.remote(self.knowledge_ref, clusters) for e, clusters in plans.items()}
        queues = {(e, cid): list(members) for e, clusters in plans.items() for cid, members in clusters.items()}
        unabsorbed: dict[tuple[str, str], object] = {}  # cluster -> its last finished turn not yet at the edge
        running: dict = {}  # status ref -> (edge, cluster, device, deadline, result ref)
        dropped: dict[str, str] = {}
        lost_edges: set[str] = set()

        def start_next(key: tuple[str, str], previous) -> None:
            e, cid = key
            if e in lost_edges:
                return
            if not queues[key]:
                unabsorbed[key] = previous
                return
            d = queues[key].pop(0)
            edge = self.edges[e]
            adapter = edge.begin_turn.remote(cid, d, previous, ready[e])
            emulation = self.run_plan.emulation(e, plans[e], cid, d) if self.run_plan else None
            result, status = self.devices[d].train_turn.options(num_returns=2).remote(
                adapter, edge, cid, steps, round_idx, d, emulation=emulation)
            running[status] = (e, cid, d, time.monotonic() + timeout_s, result)

        for key in queues:
            start_next(key, None)
        while running:
            wait_s = max(0.0, min(v[3] for v in running.values()) - time.monotonic())
            done, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)
            for ref in done:
                e, cid, d, _, result = running.pop(ref)
                try:
                    ray.get(ref)  # the turn's small status; the result itself stays in the object store
                except RayError as err:
                    self._turn_failed(e, cid, d, err, dropped, lost_edges)
                    start_next((e, cid), None)  # the last finished turn was absorbed at this one's start
                else:
                    start_next((e, cid), result)
            now = time.monotonic()
            for ref, (e, cid, d, deadline, _) in list(running.items()):
                if now >= deadline:
                    running.pop(ref)
                    dropped[d] = f"timed out after {timeout_s:g}s"
                    self.edges[e].drop_turn.remote(cid, d, dropped[d])
                    start_next((e, cid), None)
        updates = self._finish_edges(plans, unabsorbed, lost_edges)
        train_s = time.perf_counter() - started  # devices' turns and the edges' updates: what the cost model models
        if len(updates) < cfg.faults.min_edge_updates:
            raise RoundFailedError(
                f"round {round_idx}: {len(updates)} edge update(s), faults.min_edge_updates is "
                f"{cfg.faults.min_edge_updates}; dropped devices: {dropped or 'none'}; lost edges: "
                f"{sorted(lost_edges) or 'none'}. Finished rounds are on disk: `gaisnet run --resume` continues")
        knowledge_ref, metrics_ref = self.cloud.aggregate_round.options(num_returns=2).remote(round_idx, *updates)
        try:
            metrics = ray.get(metrics_ref, timeout=self.timeout)
        except GetTimeoutError:
            raise TimeoutError(f"round {round_idx} did not finish within run.actor_timeout_s="
                               f"{self.timeout:.0f}s") from None
        self.knowledge_ref = knowledge_ref
        reassigned = self._after_edge_loss(lost_edges)
        metrics["faults"] = {"dropped": dropped, "lost_edges": sorted(lost_edges), "reassigned": reassigned,
                             "dead_devices": sorted(self.dead_devices), "dead_edges": sorted(self.dead_edges)}
        if "relay" in metrics:
            metrics["relay"]["bytes_down"] = self._relay_down()
        metrics["peak_rss_mb"] = self._peak_rss_mb()
        metrics["wall_s"] = time.perf_counter() - started
        if self.run_plan is not None:  # modeled vs measured, side by side
            metrics["plan"] = {**self.run_plan.metrics(plans), "measured_train_s": train_s}
        return metrics

    def _trains(self, device: str) -> bool:
        """False for a device the plan excluded from training (its memory holds no cut)."""
        return self.run_plan is None or self.run_plan.trains(device)

    def _peak_rss_mb(self) -> dict:
        """Each live actor's peak RSS so far, per kind (max, sum, how many answered) and all together."""
        kinds = {"cloud": [self.cloud],
                 "edge": [a for e, a in self.edges.items() if e not in self.dead_edges],
                 "end": [a for n, a in self.end_actors.items() if n not in self.dead_end_actors
                         and n not in self.dead_devices]}
        refs = {kind: [a.peak_rss_mb.remote() for a in actors] for kind, actors in kinds.items()}
        out: dict = {}
        for kind, rs in refs.items():
            values = []
            for r in rs:
                try:
                    values.append(ray.get(r, timeout=min(30.0, self.timeout)))
                except (RayError, GetTimeoutError):
                    pass  # an actor that died since: its peak died with it
            out[kind] = {"max": round(max(values, default=0.0), 1), "sum": round(sum(values), 1),
                         "actors": len(values)}
        out["all_actors"] = round(sum(v["sum"] for v in out.values()), 1)
        return out

    def _alive(self, actor) -> bool:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=min(30.0, self.timeout))
            return True
        except (RayActorError, GetTimeoutError):
            return False

    def _turn_failed(self, e: str, cid: str, d: str, err: Exception, dropped: dict, lost_edges: set) -> None:
        """Tell a dead edge from a dead or failing device (by which actor Ray says died, so a busy
        edge is never mistaken for a dead one), and record which it was."""
        dead = _dead_actor_id(err)
        edge_died = dead == self.edges[e]._actor_id.hex()
        device_died = dead == self.devices[d]._actor_id.hex()
        if dead is not None and not (edge_died or device_died):  # some other actor: ask the two
            edge_died = not self._alive(self.edges[e])
            device_died = not edge_died and not self._alive(self.devices[d])
        if edge_died and e not in lost_edges:
            lost_edges.add(e)
            self.dead_edges.add(e)
            log.warning("edge %s died in the round; its clusters sit the round out", e)
        if e in lost_edges:
            dropped[d] = f"its edge {e} died"
            return
        if device_died:
            self.dead_devices.add(d)
            dropped[d] = f"died: {type(err).__name__}"
        else:
            dropped[d] = f"turn failed: {str(err).strip().splitlines()[-1][:300]}"
        log.warning("device %s sits out the round: %s", d, dropped[d])
        self.edges[e].drop_turn.remote(cid, d, dropped[d])

    def _finish_edges(self, plans: dict, unabsorbed: dict, lost_edges: set) -> list:
        """Each surviving edge's update ref (only edges that delivered one)."""
        pending = {}
        for e, clusters in plans.items():
            if e in lost_edges:
                continue
            cids = list(clusters)
            update, status = self.edges[e].finish_round.options(num_returns=2).remote(
                cids, *[unabsorbed.get((e, c)) for c in cids])
            pending[status] = (e, update)
        updates = []
        for status, (e, update) in pending.items():
            try:
                ray.get(status, timeout=self.timeout)
                updates.append(update)
            except RayError as err:
                if _dead_actor_id(err) == self.edges[e]._actor_id.hex():
                    lost_edges.add(e)
                    self.dead_edges.add(e)
                log.warning("edge %s delivers no update this round: %s", e, str(err).strip().splitlines()[-1][:300])
        return updates

    def _after_edge_loss(self, lost_edges: set) -> dict[str, str]:
        """``faults.edge_failure``: move a lost edge's devices to the surviving edge with the fewest
        devices (reassign), or let them sit out the rest of the run (sit_out)."""
        moved: dict[str, str] = {}
        if not lost_edges or self.cfg.faults.edge_failure != "reassign":
            return moved
        survivors = [e for e in self.members if e not in self.dead_edges]
        for lost in sorted(lost_edges):
            for d in self.members.pop(lost, []):
                if d in self.dead_devices or not survivors:
                    continue
                target = min(survivors, key=lambda e: (len(self.members[e]), e))
                try:
                    ray.get(self.edges[target].add_devices.remote([d]), timeout=self.timeout)
                except RayError as err:
                    log.warning("cannot move %s to %s: %s", d, target, err)
                    continue
                self.members[target].append(d)
                moved[d] = target
        return moved

    def _relay_down(self) -> dict:
        """Send each edge and device its part of the cloud's new base (one object per distinct part,
        pulled by the nodes holding it) and wait until all hold it, so the next round runs on it
        everywhere."""
        nodes = {**{e: a for e, a in self.edges.items() if e not in self.dead_edges},
                 **{n: a for n, a in self.end_actors.items()
                    if n not in self.dead_devices and n not in self.dead_end_actors}}
        packages = self._part_refs({name: self.node_parts[name] for name in nodes})
        refs = {name: a.update_base.remote(*[packages[p] for p in self.node_parts[name]]) for name, a in nodes.items()}
        written = {}
        for name, ref in refs.items():
            try:
                written[name] = ray.get(ref, timeout=self.timeout)
            except RayActorError:  # died since the round: it is out from now on, like in a round
                if name in self.edges:
                    self.dead_edges.add(name)
                else:  # an EndNode, or a pool worker with every device it hosted
                    self.dead_end_actors.add(name)
                    self.dead_devices |= {d for d, a in self.devices.items() if a is self.end_actors[name]}
        return relay_down_bytes(written)

    # ------------------------------------------------------------------------------ closing
    def close(self) -> None:
        actors = [a for a in [self.cloud, *self.edges.values(), *self.end_actors.values()] if a is not None]
        if self.cfg.run.audit_messages:
            for a in actors:
                try:
                    ray.get(a.dump_audit.remote(str(self.run_dir / "audit")), timeout=self.timeout)
                except RayActorError:
                    pass  # a dead node's audit died with it
        for a in actors:
            ray.kill(a)
