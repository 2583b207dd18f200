"""The Ray driver of a GaisNet run: places the tier actors and turns the round scheduler's
decisions into actor calls.

The driver never touches a tensor: it wires object refs between actors (a cluster's members are a
chain of refs, so they train in turn while clusters and edges run in parallel) and only reads small
status objects. Which turn runs when, what a failure means and what the round reports is decided by
``rounds.RoundScheduler`` (no Ray, unit-tested); what is left here is Ray: submitting calls, waiting
on refs, telling a dead actor from a failing call, restarting a worker.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from .actors import CloudNode, EdgeNode, EndNode, EndWorker, tier_options
from .actors.audited import deferred
from .config import TIER_RESOURCES, Config
from .schemes import scheme_of
from .schemes.topology import deal_to_workers, devices_by_edge
from .layout import RunLayout
from .models.cuts import NoWeights
from .planner.command import sample_counts as planned_sample_counts
from .planner.runtime import prepare_run
from .privacy.secagg_check import check_secure_aggregation
from .tiers import resolve_end_pool
from .rounds import (
    BeginEdge,
    DropTurn,
    FinishEdge,
    RestartHost,
    RoundFailedError,
    RoundMetrics,
    RoundScheduler,
    StartTurn,
    Turn,
)

__all__ = ["GaisNetDriver", "PlacementError", "RoundFailedError"]

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """Tier actors could not be placed: the cluster lacks the tier resources they ask for."""


def _own_actor_id(actor) -> str:
    """Run inside an actor (``__ray_call__``): its id, as Ray's errors name it (hex)."""
    return ray.get_runtime_context().get_actor_id()


def _process_start_time() -> float | None:
    """When this process started (seconds since the epoch), from /proc; None where there is none."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _actor_started(actor) -> dict:
    """Run inside an actor once its constructor returned: its id, and when its worker process
    started and when it was ready (epoch seconds; the difference is the worker's boot, its imports
    and the constructor: the model built, the part pulled, the data derived)."""
    return {"id": ray.get_runtime_context().get_actor_id(), "process_start": _process_start_time(),
            "ready": time.time()}


def _dead_actor_id(err: BaseException) -> str | None:
    """The id (hex) of the actor whose death caused ``err``, if Ray says so (also through a task
    that failed on a dead actor's result)."""
    for e in (err, getattr(err, "cause", None)):
        if isinstance(e, RayActorError) and getattr(e, "actor_id", None):
            return e.actor_id
    return None


def _config_num_layers(cfg: Config) -> int | None:
    """The foundation's block count from the model's config alone (no weights), or None if that
    cannot be read here (then the driver asks the cloud once it is up)."""
    from .models.sources import model_config_dict, num_blocks

    try:
        return num_blocks(model_config_dict(cfg.model))
    except Exception:  # noqa: BLE001 - a source only the cloud's node can read: ask the cloud instead
        return None


def get_within(refs, timeout: float, what: str):
    """``ray.get`` under ``run.actor_timeout_s``. Ray's own timeout says only "some object(s) not
    ready"; this one names what was awaited and the key that bounds it (a busy or slow host needs more)."""
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within run.actor_timeout_s={timeout:g}s (a busy or slow "
                           f"host: raise it, e.g. --set run.actor_timeout_s={max(3600, 4 * timeout):g})") from None


def _last_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__


class GaisNetDriver:
    def __init__(self, cfg: Config, run_dir: str | Path, planned: tuple | None = None, serving: bool = True):
        # the planner (topology.planner, planner.*): the plan's cuts go into the config every tier builds
        # from; ``planned``: what planner.runtime.prepare_run already returned for ``cfg`` (run_job plans
        # before its memory check)
        self.cfg, self.run_plan = planned or prepare_run(cfg, sample_counts=planned_sample_counts(cfg),
                                                         run_dir=run_dir)
        # the pool size once, here: `auto` reads this process's CPUs, which a caller may pin later
        self.cfg = resolve_end_pool(self.cfg)
        # False (`gaisnet run` without --serve): the cloud calibrates routing for the last round only
        self.serving = serving
        cfg = self.cfg
        check_secure_aggregation(cfg)  # a clear ConfigError where the edge could not unmask
        self._secagg_rosters: dict[str, dict[str, int]] = {}  # edge -> this round's members (device -> index)
        self.run_dir = Path(run_dir)
        if self.run_plan is not None:
            self.run_plan.record(self.run_dir)
        self.by_edge = devices_by_edge(cfg.topology)
        self.end_actors: dict = {}  # host name -> EndNode (name = device) or EndWorker (topology.end_pool)
        self.hosts: dict[str, str] = {}  # device -> the end actor's name that runs its turns
        self.timeout = cfg.run.actor_timeout_s
        self.turn_steps = scheme_of(cfg).turn_steps(cfg)  # optimizer steps of one device turn
        self.cloud = None
        self.edges: dict = {}
        self.devices: dict = {}  # device -> its end actor
        self.knowledge_ref = None
        self.sample_counts: dict[str, int] = {}
        self.initial_eval: dict | None = None
        self.num_layers: int | None = None  # the foundation's blocks, once start() knows them
        self.node_parts: dict[str, list] = {}  # edge / end actor -> the parts of the base it holds (ModelPart)
        self.scheduler: RoundScheduler | None = None
        self._actor_ids: dict[str, str] = {}  # node name -> actor id (hex), reported by each actor at start
        self._t0: float | None = None  # when start() began (epoch s)
        self.startup: dict = {}  # start()'s timeline: began_at (epoch s), then seconds after it
        self._events: dict = {}  # ref -> ("turn", Turn) | ("finish", edge) | ("host", name)
        self._turn_refs: dict[Turn, object] = {}
        self._results: dict[Turn, object] = {}  # a finished turn's result ref, until the edge absorbs it
        self._ready: dict[str, object] = {}  # edge -> its begin_round ref
        self._updates: dict[str, object] = {}  # edge -> its update ref

    @property
    def members(self) -> dict[str, list[str]]:
        """Edge -> the devices it serves (changes when an edge is lost and its devices move)."""
        return self.scheduler.members if self.scheduler else {e: list(ds) for e, ds in self.by_edge.items()}

    # ---------------------------------------------------------------------------- placement
    def start(self, resume_round: int | None = None) -> None:
        """Place 1 cloud, the edges and the end devices by their tier resources, wait until ready.
        ``resume_round``: the last round a resumed run has on disk (the cloud starts from it)."""
        t = self.cfg.topology
        self._t0 = time.time()
        self.startup = {"began_at": self._t0, "actors": {}}
        self.cloud = CloudNode.options(**tier_options("cloud", t.cloud)).remote(self.cfg, str(self.run_dir),
                                                                               resume_round, self.serving)
        # the block count from the model's config, so the edges and end actors start (spawn, import
        # torch) while the cloud builds and pre-trains the foundation; else after the cloud is up
        num_layers = _config_num_layers(self.cfg)
        if num_layers is None:
            self._wait_ready({"cloud": self.cloud})
            num_layers = get_within(self.cloud.num_layers.remote(), self.timeout, "the cloud's foundation")
        # each node gets only its part of the base: one object per distinct part, pulled by the nodes
        # that hold it (devices: embeddings, front and back blocks, head; edges: middle blocks)
        from .hfsl.factory import tier_parts  # torch: here, after Ray is up, not at the driver's import

        parts = tier_parts(self.cfg, num_layers)
        self.num_layers = num_layers
        all_devices = [d for ds in self.by_edge.values() for d in ds]
        self.node_parts = {e: [parts[e]] for e in self.by_edge}
        pool = t.end_pool
        if pool:  # logical devices on a bounded pool, an edge's devices together
            hosted = deal_to_workers(self.by_edge, pool)
            self.node_parts.update({name: list(dict.fromkeys(parts[d] for d in ds)) for name, ds in hosted.items()})
        else:
            hosted = {d: [d] for d in all_devices}
            self.node_parts.update({d: [parts[d]] for d in all_devices})
        self.hosts = {d: name for name, ds in hosted.items() for d in ds}
        packages = self._part_refs(self.node_parts)
        for e, devices in self.by_edge.items():
            self.edges[e] = EdgeNode.options(**tier_options("edge", t.edge)).remote(
                e, self.cfg, devices, deferred(packages[parts[e]]), run_dir=str(self.run_dir))
        for name in hosted:
            self._place_end_actor(name, packages)
        if "cloud" not in self._actor_ids:
            self._wait_ready({"cloud": self.cloud})
            built = get_within(self.cloud.num_layers.remote(), self.timeout, "the cloud's foundation")
            if built != num_layers:
                raise RuntimeError(f"the foundation has {built} blocks, its config says {num_layers}")
        # version 0 and the evaluation before round 1 need only the cloud: they run while the others start
        self.knowledge_ref = self.cloud.initial_knowledge.remote()
        initial_eval = self.cloud.evaluate.remote()
        self._wait_ready({**self.edges, **self.end_actors})
        if pool:
            profiles = [p for ps in get_within([a.profiles.remote() for a in self.end_actors.values()],
                                               self.timeout, "the end workers' profiles") for p in ps]
        else:
            profiles = get_within([a.profile.remote() for a in self.end_actors.values()], self.timeout,
                                  "the end devices' profiles")
        self.sample_counts = {p["device_id"]: p["num_samples"] for p in profiles}
        self.scheduler = RoundScheduler(self.cfg, self.by_edge, self.hosts, self.sample_counts, self.run_plan)
        self.startup["all_ready_s"] = time.time() - self._t0
        self.initial_eval = get_within(initial_eval, self.timeout, "the cloud's evaluation before round 1")
        self.startup["initial_eval_done_s"] = time.time() - self._t0

    def _place_end_actor(self, name: str, packages: dict) -> None:
        """Create the end actor ``name`` (an EndNode for one device, or a pool EndWorker)."""
        res = tier_options("end", self.cfg.topology.end)
        devices = [d for d, h in self.hosts.items() if h == name]
        if self.cfg.topology.end_pool:
            actor = EndWorker.options(**res).remote(name, self.cfg, devices,
                                                    *[deferred(packages[p]) for p in self.node_parts[name]])
        else:
            actor = EndNode.options(**res).remote(name, self.cfg, deferred(packages[self.node_parts[name][0]]))
        self.end_actors[name] = actor
        self.devices.update({d: actor for d in devices})

    def _part_refs(self, node_parts: dict[str, list]) -> dict:
        """One object per distinct part the nodes hold: the cloud cuts it out of its current base. An
        empty part (an edge under FL) gets ``NoWeights``: nothing to pull, no model library to load."""
        wanted = dict.fromkeys(p for ps in node_parts.values() for p in ps)
        return {p: NoWeights(self.num_layers) if p.is_empty else self.cloud.foundation.remote(p) for p in wanted}

    def _wait_ready(self, actors: dict) -> None:
        """Wait until the actors are constructed; each reports its actor id (kept, to tell which
        actor died from Ray's errors)."""
        refs = {a.__ray_call__.remote(_actor_started): name for name, a in actors.items()}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout)
        for r in ready:  # surfaces a constructor error (bad model path, bad data) with its cause
            started = ray.get(r)
            self._actor_ids[refs[r]] = started["id"]
            if self._t0 is not None:  # when each actor's process started and was ready
                self.startup["actors"][refs[r]] = {
                    "process_start_s": None if started["process_start"] is None
                    else round(started["process_start"] - self._t0, 3),
                    "ready_s": round(started["ready"] - self._t0, 3)}
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
        """One round, surviving device and edge failures; returns its metrics row.

        The scheduler plans the round and decides; this loop carries its actions out (begin an
        edge's round, start a turn once its host is free, drop a turn, restart a hung worker,
        finish an edge) and feeds back what Ray reports (a status ready or raising, a deadline
        passed). The cloud aggregates the edges that delivered, weighted by the samples that were
        actually trained on.
        """
        started = time.perf_counter()
        sched = self.scheduler
        self._events, self._turn_refs, self._results, self._ready, self._updates = {}, {}, {}, {}, {}
        self._act(sched.begin_round(round_idx), round_idx)
        while sched.round_open:
            deadline = sched.next_deadline()
            if not self._events:
                raise RuntimeError(f"round {round_idx}: the scheduler waits, but no call is outstanding")
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(self._events), num_returns=1, timeout=wait_s)
            for ref in done:
                self._act(self._on_event(ref), round_idx)
            self._act(sched.expire(), round_idx)
        edges = sched.delivered()  # raises RoundFailedError below faults.min_edge_updates
        train_s = time.perf_counter() - started  # devices' turns and the edges' updates: what the cost model models
        knowledge_ref, metrics_ref = self.cloud.aggregate_round.options(num_returns=2).remote(
            round_idx, *[self._updates[e] for e in edges])
        cloud_metrics = get_within(metrics_ref, self.timeout, f"round {round_idx}'s aggregation and evaluation")
        self.knowledge_ref = knowledge_ref
        self._results, self._updates = {}, {}
        for move in sched.reassignments():
            try:
                ray.get(self.edges[move.target].add_devices.remote([move.device]), timeout=self.timeout)
            except RayError as err:
                log.warning("cannot move %s to %s: %s", move.device, move.target, err)
                continue
            sched.moved(move)
        faults = sched.fault_report()
        relay_down = self._relay_down() if "relay" in cloud_metrics else None
        return RoundMetrics(cloud=cloud_metrics, relay_down=relay_down, faults=faults,
                            peak_rss_mb=self._peak_rss_mb(), wall_s=time.perf_counter() - started,
                            plan=sched.plan_metrics(train_s)).row()

    def _act(self, actions: list, round_idx: int) -> None:
        """Carry out the scheduler's actions, in order (a drop reaches the edge before the next
        member's ``begin_turn``: one caller's calls to an actor run in submission order)."""
        for a in actions:
            if isinstance(a, BeginEdge):
                self._ready[a.edge] = self.edges[a.edge].begin_round.remote(self.knowledge_ref, a.clusters)
                if self.cfg.privacy.secure_aggregation:  # before any turn: devices' calls run in submission order
                    try:
                        self._secagg_rosters[a.edge] = self._exchange_keys(a.edge, round_idx, a.clusters)
                    except (RayError, GetTimeoutError) as err:
                        # the edge (the exchange's relay) is lost or stuck: no roster, so no member can
                        # mask; its turns fail on the edge and the scheduler treats it as any lost edge
                        # (faults.edge_failure) while the other edges' rounds go on
                        log.warning("%s's secure-aggregation key exchange failed: %s", a.edge, _last_line(err))
                        self._secagg_rosters[a.edge] = {}
            elif isinstance(a, StartTurn):
                t = a.turn
                edge = self.edges[t.edge]
                previous = self._results.pop(a.previous) if a.previous is not None else None
                adapter = edge.begin_turn.remote(t.cluster, t.device, previous, self._ready[t.edge])
                result, status = self.devices[t.device].train_turn.options(num_returns=2).remote(
                    adapter, edge, t.cluster, self.turn_steps, round_idx, t.device,
                    emulation=self.scheduler.emulation(t))
                self._results[t] = result
                self._turn_refs[t] = status
                self._events[status] = ("turn", t)
            elif isinstance(a, DropTurn):
                self._events.pop(self._turn_refs.pop(a.turn, None), None)
                self._results.pop(a.turn, None)
                self.edges[a.turn.edge].drop_turn.remote(a.turn.cluster, a.turn.device, a.reason)
            elif isinstance(a, RestartHost):
                self._restart(a.host)
            elif isinstance(a, FinishEdge):
                cids = list(a.last)
                replies = []
                if self.cfg.privacy.secure_aggregation:  # the survivors reveal what unmasks their sum
                    finished = [a.last[c].device for c in cids if a.last[c] is not None]
                    from .privacy.secround import reveal_sets

                    alive, gone = reveal_sets(self._secagg_rosters.get(a.edge, {}), finished)
                    # a survivor lost before its reveal is left out: any `threshold` replies unmask the sum
                    replies = list(self._gather({d: self.devices[d].secagg.remote("reveal", d, alive, gone)
                                                 for d in finished}, f"{a.edge}'s unmasking").values())
                update, status = self.edges[a.edge].finish_round.options(num_returns=2).remote(
                    cids, *[self._results.pop(a.last[c]) if a.last[c] is not None else None for c in cids], *replies)
                self._updates[a.edge] = update
                self._events[status] = ("finish", a.edge)
            else:
                raise TypeError(f"unknown scheduler action {a!r}")

    def _gather(self, refs: dict, what: str) -> dict:
        """The answers of short device calls that came within run.actor_timeout_s; a device that died
        or did not answer is left out of ``what`` (logged), the others go on."""
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.timeout)
        out = {}
        for d, ref in refs.items():
            try:
                if ref in ready:
                    out[d] = ray.get(ref)
                else:
                    log.warning("%s left out of %s: no answer within %.0f s", d, what, self.timeout)
            except RayError as err:
                log.warning("%s left out of %s: %s", d, what, _last_line(err))
        return out

    def _exchange_keys(self, edge: str, round_idx: int, clusters: dict[str, list[str]]) -> dict[str, int]:
        """Secure aggregation's key exchange for ``edge``'s round (``privacy.secround.exchange_keys``),
        through the edge as relay. Short calls, waited on here; a device that does not answer within
        run.actor_timeout_s is left out of the roster (its turn then fails to seal and it sits out)."""
        edge_actor = self.edges[edge]

        def step(name: str, asks: dict) -> dict:
            return self._gather({d: self.devices[d].secagg.remote(name, d, *a) for d, a in asks.items()},
                                f"{edge}'s secure aggregation")

        from .privacy.secround import exchange_keys, members_of

        return exchange_keys(
            edge, round_idx, members_of(clusters),
            advertise=lambda asks: step("advertise", asks),
            begin=lambda offers, t: ray.get(edge_actor.secagg_begin.remote(offers, t), timeout=self.timeout),
            share=lambda rosters: step("share", {d: (r,) for d, r in rosters.items()}),
            route=lambda sealed: ray.get(edge_actor.secagg_route.remote(sealed), timeout=self.timeout),
            deliver=lambda inboxes: [self.devices[d].secagg.remote("receive", d, box) for d, box in inboxes.items()])

    def _on_event(self, ref) -> list:
        """A ref the round waits on is ready: tell the scheduler what it says."""
        kind, what = self._events.pop(ref)
        sched = self.scheduler
        if kind == "turn":
            self._turn_refs.pop(what, None)
            try:
                ray.get(ref)  # the turn's small status; the result itself stays in the object store
            except RayError as err:
                self._results.pop(what, None)
                edge_died, host_died = self._who_died(err, what)
                cause = type(err).__name__ if host_died else _last_line(err)
                return sched.turn_failed(what, cause, edge_died=edge_died, host_died=host_died)
            return sched.turn_finished(what)
        if kind == "finish":
            try:
                ray.get(ref)
            except RayError as err:
                self._updates.pop(what, None)
                dead = _dead_actor_id(err)
                return sched.edge_failed(what, _last_line(err), died=dead is not None and dead == self._actor_ids[what])
            return sched.edge_delivered(what)
        try:  # "host": a restarted worker reports its id once constructed
            self._actor_ids[what] = ray.get(ref)
        except RayError as err:
            return sched.host_lost(what, f"its worker did not restart: {_last_line(err)}")
        return sched.host_ready(what)

    def _who_died(self, err: RayError, turn: Turn) -> tuple[bool, bool]:
        """(edge died, host died) for a failed turn, by which actor Ray says died, so a busy edge
        is never mistaken for a dead one; some other actor named: ask the two."""
        dead = _dead_actor_id(err)
        edge_died = dead is not None and dead == self._actor_ids.get(turn.edge)
        host_died = dead is not None and dead == self._actor_ids.get(turn.host)
        if dead is not None and not (edge_died or host_died):
            edge_died = not self._alive(self.edges[turn.edge])
            host_died = not edge_died and not self._alive(self.end_actors[turn.host])
        return edge_died, host_died

    def _restart(self, host: str) -> None:
        """Kill the hung worker ``host`` and start it afresh with the same devices on the current
        base; its id comes back as an event (``host_ready``)."""
        log.warning("restarting %s: a turn on it hung; its other devices' turns wait for it", host)
        ray.kill(self.end_actors[host])
        packages = self._part_refs({host: self.node_parts[host]})
        self._place_end_actor(host, packages)
        self._events[self.end_actors[host].__ray_call__.remote(_own_actor_id)] = ("host", host)

    def _alive(self, actor) -> bool:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=min(30.0, self.timeout))
            return True
        except (RayActorError, GetTimeoutError):
            return False

    def _live_end_actors(self) -> dict:
        dead = self.scheduler.dead_hosts if self.scheduler else {}
        return {n: a for n, a in self.end_actors.items() if n not in dead}

    def _live_edges(self) -> dict:
        dead = self.scheduler.dead_edges if self.scheduler else set()
        return {e: a for e, a in self.edges.items() if e not in dead}

    def _peak_rss_mb(self) -> dict:
        """Each live actor's peak RSS so far, per kind (max, sum, how many answered) and all together."""
        stalled = self.scheduler.stalled_hosts  # would answer only after their hung turn: skipped
        kinds = {"cloud": [self.cloud], "edge": list(self._live_edges().values()),
                 "end": [a for n, a in self._live_end_actors().items() if n not in stalled]}
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

    def _relay_down(self) -> dict:
        """Send each edge and device its part of the cloud's new base (one object per distinct part,
        pulled by the nodes holding it) and wait until all hold it, so the next round runs on it
        everywhere."""
        nodes = {**self._live_edges(), **self._live_end_actors()}
        packages = self._part_refs({name: self.node_parts[name] for name in nodes})
        refs = {name: a.update_base.remote(*[packages[p] for p in self.node_parts[name]]) for name, a in nodes.items()}
        written = {}
        stalled = self.scheduler.stalled_hosts  # takes it after its hung turn, before its next one: not waited on
        for name, ref in refs.items():
            if name in stalled:
                continue
            try:
                written[name] = ray.get(ref, timeout=self.timeout)
            except RayActorError as err:  # died since the round: it is out from now on, like in a round
                if name in self.edges:
                    self.scheduler.edge_lost(name)
                else:  # an EndNode, or a pool worker with every device it hosted
                    self.scheduler.host_lost(name, f"died: {type(err).__name__}")
        from .hfsl.factory import relay_down_bytes

        return relay_down_bytes(written)

    # ------------------------------------------------------------------------------ closing
    def close(self) -> None:
        actors = [a for a in [self.cloud, *self.edges.values(), *self.end_actors.values()] if a is not None]
        if self.cfg.run.audit_messages:
            for a in actors:
                try:
                    ray.get(a.dump_audit.remote(str(RunLayout(self.run_dir).audit)), timeout=self.timeout)
                except RayActorError:
                    pass  # a dead node's audit died with it
        for a in actors:
            ray.kill(a)
