"""The round scheduler: which turn runs where and when, as a state machine with no Ray in it.

Why: the fault logic of a round (chains of turns per cluster, deadlines, drops, lost edges,
restarts, reassignment, the quorum) used to live in a closure over five mutable maps inside the
Ray driver, testable only with real actors. Here it takes events (a turn finished or failed, the
clock passed a deadline, a worker came back) and returns actions (``BeginEdge``, ``StartTurn``,
``DropTurn``, ``RestartHost``, ``FinishEdge``) that a runtime carries out: the Ray driver as actor
calls, the in-process runtime as direct calls. Unit tests drive it with a fake clock.

Rules it keeps:
- a cluster's members train in turn; a member that fails, dies or times out sits the round out
  and the next one goes on from the last member that finished (the edge undoes the dropped turn);
- a host (an ``EndNode``, or an ``EndWorker`` serving many logical devices one turn at a time) gets
  a turn only when it is free, so a turn's deadline starts when the turn starts, never while it
  waits behind another device's turn on the same serial worker;
- a turn that times out on a shared worker gets the worker restarted (``RestartHost``): a serial
  actor cannot be interrupted, so its hung call would hold every other device it hosts, this
  round and the next. The other devices' turns wait for the fresh worker (``faults`` keeps them);
  they are not dropped, because the hang is one device's, not theirs. A single-device host is
  left alone: only its own device waits behind the hang, and it may recover (slow is not dead);
- a dead host takes all the devices it hosts out of the run; a dead edge takes its clusters out
  of the round, and its devices move (``faults.edge_failure: reassign``) or sit out (``sit_out``);
- fewer than ``faults.min_edge_updates`` edge updates fail the round (``RoundFailedError``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..config import Config
from ..schemes.plan import participants, plan_clusters
from .actions import BeginEdge, DropTurn, FinishEdge, Move, RestartHost, StartTurn, Turn
from .metrics import FaultReport

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """Too few edges delivered an update for the round to aggregate (``faults.min_edge_updates``)."""


# ------------------------------------------------------------------------------ round state
@dataclass
class _Chain:
    """One cluster's members in training order and where the chain stands."""

    edge: str
    cluster: str
    queue: list[str]  # members not started yet
    previous: Turn | None = None  # finished, not yet absorbed by the edge
    waiting: Turn | None = None  # ready, its host busy
    running: Turn | None = None

    @property
    def done(self) -> bool:
        return not self.queue and self.waiting is None and self.running is None


@dataclass
class _Round:
    index: int
    plans: dict[str, dict[str, list[str]]]  # edge -> cluster id -> members
    chains: dict[tuple[str, str], _Chain]
    running: dict[Turn, float] = field(default_factory=dict)  # -> deadline
    busy: dict[str, Turn | None] = field(default_factory=dict)  # host -> its turn (None: restarting)
    restarting: dict[str, float] = field(default_factory=dict)  # host -> deadline
    finishing: dict[str, float] = field(default_factory=dict)  # edge -> deadline
    delivered: set[str] = field(default_factory=set)
    lost_edges: set[str] = field(default_factory=set)
    stalled: set[str] = field(default_factory=set)  # single-device hosts whose timed-out call may still run
    dropped: dict[str, str] = field(default_factory=dict)
    reassigned: dict[str, str] = field(default_factory=dict)


class RoundScheduler:
    """The run's fleet (members per edge, dead nodes) and the round in progress.

    ``by_edge``: edge -> its devices; ``hosts``: device -> the actor that runs its turns (itself,
    or a pool worker); ``sample_counts``: device -> samples (for clustering); ``run_plan``: the
    planner's ``RunPlan`` or None; ``clock``: monotonic seconds (a fake one in tests).
    """

    def __init__(self, cfg: Config, by_edge: dict[str, list[str]], hosts: dict[str, str],
                 sample_counts: dict[str, int], run_plan=None, clock: Callable[[], float] = time.monotonic,
                 deadlines: bool = True):
        self.cfg, self.run_plan, self.clock = cfg, run_plan, clock
        self.members = {e: list(ds) for e, ds in by_edge.items()}  # changes when an edge is lost
        self.hosts = dict(hosts)
        self.hosted: dict[str, list[str]] = {}
        for d, h in self.hosts.items():
            self.hosted.setdefault(h, []).append(d)
        self.sample_counts = dict(sample_counts)
        # ``deadlines=False``: the in-process runtime calls synchronously, nothing can time out
        self.turn_timeout_s = (cfg.faults.turn_timeout_s or cfg.run.actor_timeout_s) if deadlines else None
        self.call_timeout_s = cfg.run.actor_timeout_s if deadlines else None
        self.dead_devices: set[str] = set()
        self.dead_edges: set[str] = set()
        self.dead_hosts: dict[str, str] = {}  # host -> why
        self._round: _Round | None = None

    # ------------------------------------------------------------------------------- plan
    def begin_round(self, round_idx: int) -> list:
        """Plan the round (participants, clusters) and return the first actions."""
        plans = {}
        for e, devices in self.members.items():
            live = participants(self.cfg, e, [d for d in devices if d not in self.dead_devices and self._trains(d)],
                                round_idx)
            if e not in self.dead_edges and live:
                plans[e] = plan_clusters(self.cfg, e, {d: self.sample_counts[d] for d in live},
                                         self.run_plan.clusters_of(e) if self.run_plan else None)
        chains = {(e, cid): _Chain(e, cid, list(ms)) for e, cs in plans.items() for cid, ms in cs.items()}
        self._round = rnd = _Round(round_idx, plans, chains)
        acts: list = []
        for e, clusters in plans.items():
            acts.append(BeginEdge(e, clusters))
            for cid in clusters:
                self._advance(rnd.chains[(e, cid)], acts)
        return acts

    @property
    def plans(self) -> dict[str, dict[str, list[str]]]:
        return self._round.plans

    @property
    def round_open(self) -> bool:
        """True while a turn, a restart or an edge's finish is outstanding."""
        rnd = self._round
        return rnd is not None and bool(rnd.running or rnd.restarting or rnd.finishing
                                        or any(not c.done for c in rnd.chains.values()
                                               if c.edge not in rnd.lost_edges))

    @property
    def stalled_hosts(self) -> set[str]:
        """Hosts of this round whose turn timed out and that were not restarted: their hung call
        may still run, so a call to them now would wait behind it (don't wait on one)."""
        return set(self._round.stalled) if self._round else set()

    def emulation(self, turn: Turn):
        """The planner's device emulation for ``turn`` (None without a planner)."""
        if self.run_plan is None:
            return None
        return self.run_plan.emulation(turn.edge, self._round.plans[turn.edge], turn.cluster, turn.device)

    def next_deadline(self) -> float | None:
        rnd = self._round
        times = [*rnd.running.values(), *rnd.restarting.values(), *rnd.finishing.values()]
        times = [t for t in times if t is not None]
        return min(times, default=None)

    def _trains(self, device: str) -> bool:
        """False for a device the plan excluded from training (its memory holds no cut)."""
        return self.run_plan is None or self.run_plan.trains(device)

    def _deadline(self, timeout_s: float | None) -> float | None:
        return None if timeout_s is None else self.clock() + timeout_s

    # ---------------------------------------------------------------------------- chains
    def _advance(self, chain: _Chain, acts: list) -> None:
        """Make the chain's next member ready (start it if its host is free), or finish the edge."""
        rnd = self._round
        while chain.queue and chain.edge not in rnd.lost_edges:
            d = chain.queue.pop(0)
            if d in self.dead_devices:  # its host died earlier in this round
                self._drop(Turn(chain.edge, chain.cluster, d, self.hosts[d]),
                           self.dead_hosts.get(self.hosts[d], "died"), acts)
                continue
            chain.waiting = Turn(chain.edge, chain.cluster, d, self.hosts[d])
            self._dispatch(acts)
            return
        self._maybe_finish(chain.edge, acts)

    def _dispatch(self, acts: list) -> None:
        """Start every ready turn whose host is free, in plan order."""
        rnd = self._round
        for chain in rnd.chains.values():
            turn = chain.waiting
            if turn is None or turn.host in rnd.busy:
                continue
            chain.waiting, chain.running, previous, chain.previous = None, turn, chain.previous, None
            rnd.busy[turn.host] = turn
            rnd.running[turn] = self._deadline(self.turn_timeout_s)
            acts.append(StartTurn(turn, previous))

    def _settle(self, turn: Turn) -> _Chain:
        """Take a started turn off its host; returns its chain."""
        rnd = self._round
        rnd.running.pop(turn, None)
        if rnd.busy.get(turn.host) == turn:
            del rnd.busy[turn.host]
        chain = rnd.chains[(turn.edge, turn.cluster)]
        chain.running = None
        return chain

    def _drop(self, turn: Turn, reason: str, acts: list) -> None:
        self._round.dropped[turn.device] = reason
        log.warning("device %s sits out the round: %s", turn.device, reason)
        if turn.edge not in self._round.lost_edges:
            acts.append(DropTurn(turn, reason))

    def _maybe_finish(self, edge: str, acts: list) -> None:
        rnd = self._round
        if edge in rnd.lost_edges or edge in rnd.finishing or edge in rnd.delivered:
            return
        chains = [c for c in rnd.chains.values() if c.edge == edge]
        if all(c.done for c in chains):
            rnd.finishing[edge] = self._deadline(self.call_timeout_s)
            acts.append(FinishEdge(edge, {c.cluster: c.previous for c in chains}))

    # ---------------------------------------------------------------------------- events
    def turn_finished(self, turn: Turn) -> list:
        """``turn`` ended well: its result is the cluster's newest, passed to the next member."""
        acts: list = []
        if turn not in self._round.running:
            return acts  # dropped already (timed out); its late result is not used
        chain = self._settle(turn)
        if turn.edge not in self._round.lost_edges:
            chain.previous = turn
            self._advance(chain, acts)
        self._dispatch(acts)
        return acts

    def turn_failed(self, turn: Turn, cause: str, *, edge_died: bool = False, host_died: bool = False) -> list:
        """``turn`` raised. ``edge_died`` / ``host_died``: the runtime found that actor dead
        (``cause``: the error's type then; otherwise its last line)."""
        acts: list = []
        if turn not in self._round.running:
            return acts
        chain = self._settle(turn)
        if edge_died:
            self._lose_edge(turn.edge)
        if turn.edge in self._round.lost_edges:
            self._round.dropped[turn.device] = f"its edge {turn.edge} died"
        elif host_died:
            self._drop(turn, f"died: {cause}", acts)
            self.host_lost(turn.host, f"died: {cause}", _acts=acts)
        else:
            self._drop(turn, f"turn failed: {cause}", acts)
        self._advance(chain, acts)  # the last finished turn was absorbed at this one's start
        self._dispatch(acts)
        return acts

    def expire(self) -> list:
        """Act on every deadline the clock has passed: drop timed-out turns (restarting a shared
        host), give up on restarts and on edges' finishes that take longer than a call may."""
        rnd, now, acts = self._round, self.clock(), []
        for turn, deadline in list(rnd.running.items()):
            if deadline is None or now < deadline:
                continue
            chain = self._settle(turn)
            self._drop(turn, f"timed out after {self.turn_timeout_s:g}s", acts)
            if len(self.hosted.get(turn.host, ())) > 1 and turn.host not in self.dead_hosts:
                rnd.busy[turn.host] = None
                rnd.restarting[turn.host] = self._deadline(self.call_timeout_s)
                acts.append(RestartHost(turn.host, tuple(self.hosted[turn.host])))
            else:
                rnd.stalled.add(turn.host)
            self._advance(chain, acts)
        for host, deadline in list(rnd.restarting.items()):
            if deadline is not None and now >= deadline:
                self.host_lost(host, f"its worker did not come back within {self.call_timeout_s:g}s", _acts=acts)
        for edge, deadline in list(rnd.finishing.items()):
            if deadline is not None and now >= deadline:
                acts += self.edge_failed(edge, f"no update within {self.call_timeout_s:g}s")
        self._dispatch(acts)
        return acts

    def host_ready(self, host: str) -> list:
        """A restarted host is up: its waiting turns start now (their deadlines with them)."""
        acts: list = []
        rnd = self._round
        if rnd is not None and host in rnd.restarting:
            del rnd.restarting[host]
            rnd.busy.pop(host, None)
            self._dispatch(acts)
        return acts

    def host_lost(self, host: str, why: str, _acts: list | None = None) -> list:
        """``host`` died (or never came back): every device it hosts is out of the run; its turns
        waiting in this round sit out at once."""
        acts = [] if _acts is None else _acts
        if host in self.dead_hosts:
            return acts
        self.dead_hosts[host] = why
        self.dead_devices |= set(self.hosted.get(host, ()))
        rnd = self._round
        if rnd is None:
            return acts
        rnd.restarting.pop(host, None)
        if rnd.busy.get(host, ...) is None:
            rnd.busy.pop(host, None)
        for chain in rnd.chains.values():
            if chain.waiting is not None and chain.waiting.host == host:
                turn, chain.waiting = chain.waiting, None
                self._drop(turn, why, acts)
                self._advance(chain, acts)
        return acts

    def _lose_edge(self, edge: str) -> None:
        rnd = self._round
        if edge in rnd.lost_edges:
            return
        rnd.lost_edges.add(edge)
        self.dead_edges.add(edge)
        rnd.finishing.pop(edge, None)
        for chain in rnd.chains.values():  # turns not started yet are abandoned
            if chain.edge == edge:
                chain.queue, chain.waiting = [], None
        log.warning("edge %s died in the round; its clusters sit the round out", edge)

    def edge_lost(self, edge: str) -> None:
        """An edge found dead outside a round's turns (e.g. in relay down): out from now on."""
        if self._round is not None and self.round_open:
            self._lose_edge(edge)
        else:
            self.dead_edges.add(edge)

    def edge_delivered(self, edge: str) -> list:
        self._round.finishing.pop(edge, None)
        self._round.delivered.add(edge)
        return []

    def edge_failed(self, edge: str, why: str, *, died: bool = False) -> list:
        """The edge's ``finish_round`` raised (``died``: the edge actor is dead)."""
        rnd = self._round
        rnd.finishing.pop(edge, None)
        if died:
            rnd.lost_edges.add(edge)
            self.dead_edges.add(edge)
        log.warning("edge %s delivers no update this round: %s", edge, why)
        return []

    # ------------------------------------------------------------------------ round's end
    def delivered(self) -> list[str]:
        """The edges whose update goes to the cloud, in plan order. Raises ``RoundFailedError``
        when fewer than ``faults.min_edge_updates`` delivered."""
        rnd = self._round
        edges = [e for e in rnd.plans if e in rnd.delivered]
        need = self.cfg.faults.min_edge_updates
        if len(edges) < need:
            raise RoundFailedError(
                f"round {rnd.index}: {len(edges)} edge update(s), faults.min_edge_updates is {need}; "
                f"dropped devices: {rnd.dropped or 'none'}; lost edges: {sorted(rnd.lost_edges) or 'none'}. "
                "Finished rounds are on disk: `gaisnet run --resume` continues")
        return edges

    def reassignments(self) -> Iterator[Move]:
        """``faults.edge_failure: reassign``: each live device of an edge lost this round, to the
        surviving edge with the fewest devices. Call ``moved(move)`` once the edge took it (the
        next target is chosen after that); a move not confirmed leaves the device out of the run.
        Under ``sit_out`` nothing moves."""
        rnd = self._round
        if not rnd.lost_edges or self.cfg.faults.edge_failure != "reassign":
            return
        survivors = [e for e in self.members if e not in self.dead_edges]
        for lost in sorted(rnd.lost_edges):
            for d in self.members.pop(lost, []):
                if d in self.dead_devices or not survivors:
                    continue
                yield Move(d, min(survivors, key=lambda e: (len(self.members[e]), e)))

    def moved(self, move: Move) -> None:
        self.members[move.target].append(move.device)
        self._round.reassigned[move.device] = move.target

    def fault_report(self) -> FaultReport:
        rnd = self._round
        return FaultReport(dict(rnd.dropped), sorted(rnd.lost_edges), dict(rnd.reassigned),
                           sorted(self.dead_devices), sorted(self.dead_edges))

    def plan_metrics(self, measured_train_s: float) -> dict | None:
        """The planner's modeled round beside the measured one (None without a planner)."""
        if self.run_plan is None:
            return None
        return {**self.run_plan.metrics(self._round.plans), "measured_train_s": measured_train_s}
