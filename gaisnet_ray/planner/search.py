"""The planner: each device's cut, the clusters and the bandwidth shares that minimize the modeled
round (delay, or delay + ``energy_weight`` x the devices' energy).

Why the search can stay small: for a fixed clustering and fixed shares, a member's turn time and
energy are linear in the blocks ``d`` it holds (each block adds the same device FLOPs, takes the
same from the edge, adds the same adapter bytes), and a cluster's time is the sum of its members'.
So some optimal plan gives every device either the smallest cut (2 blocks) or the largest its
memory holds: each device has at most two candidate cuts, whatever the model's depth.

- **exact** (an edge whose clusterings x cut choices are at most ``planner.exact_max_combos``):
  every set partition of the edge's devices into clusters; with ``energy_weight`` 0 each member
  takes the faster of its two cuts inside the share optimization (exact: the cluster time is a sum
  of per-member minima); otherwise every combination of the two cuts. Edges are combined exactly:
  for each candidate round delay, each edge's least-energy plan within it.
- **heuristic** (larger edges): for each cluster count K (1..16 and the counts giving cluster
  sizes 1..16), cuts chosen at the equal share, clusters formed longest-turn-first into the
  least-loaded cluster (LPT), shares optimized, cuts re-chosen at those shares and shares optimized
  again (with an energy weight, also with the cuts chosen for time alone and for energy alone);
  the round's objective picks among these plans across edges. Its gap to the exact optimum is
  measured in benchmarks/planner_bench.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .cost import RoundShape, cloud_overhead_s, edge_overhead_s, turn_seconds, turn_terms
from .profiles import DeviceProfile, EdgeProfile, Fleet
from .shares import MemberTerms, equal_shares, optimal_shares

MAX_HEURISTIC_K = 16


@dataclass
class EdgePlan:
    clusters: list[list[str]]  # device ids in training order
    blocks: dict[str, int]  # device -> blocks it holds (front + back)
    shares: list[float]  # each cluster's share of the edge's link
    delay_s: float  # the edge's round: knowledge down, slowest cluster, aggregation, update up
    energy_j: float  # its devices' energy
    method: str  # exact | heuristic | given


@dataclass
class Candidate:
    """Options of one edge: what cuts each device may take (at most two: see the module doc)."""

    devices: list[DeviceProfile]
    options: dict[str, list[int]]


@dataclass
class SearchSpace:
    shape: RoundShape
    fleet: Fleet
    energy_weight: float = 0.0
    exact_max_combos: int = 1000
    max_clusters: int | None = None  # sl: 1
    cluster_size: int | None = None  # only clusterings of this size (the "each cluster size" alternatives)


# ------------------------------------------------------------------------------ evaluation
def _terms(space: SearchSpace, edge: EdgeProfile, clusters: list[list[DeviceProfile]],
           options: dict[str, list[int]]) -> tuple[MemberTerms, list[DeviceProfile], list[list]]:
    k = len(clusters)
    members = [d for c in clusters for d in c]
    width = max(len(options[d.device_id]) for d in members)
    rows, idx = [], []
    for ci, c in enumerate(clusters):
        for d in c:
            opts = options[d.device_id]
            ts = [turn_terms(space.shape, d, edge, b, k) for b in opts]
            ts += [ts[-1]] * (width - len(ts))
            rows.append(ts)
            idx.append(ci)
    terms = MemberTerms([[t.compute_s for t in r] for r in rows], [[t.up_bits for t in r] for r in rows],
                        [[t.down_bits for t in r] for r in rows], [d.up_bps for d in members],
                        [d.down_bps for d in members], idx, k, edge.bandwidth_bps)
    return terms, members, rows


def evaluate_edge(space: SearchSpace, edge: EdgeProfile, clusters: list[list[DeviceProfile]],
                  options: dict[str, list[int]], shares: str | list[float] = "optimal",
                  method: str = "given") -> EdgePlan:
    """The edge's modeled round for these clusters; each member takes its best of ``options``
    (one option: that cut) at the shares: ``"optimal"``, ``"equal"``, or given."""
    clusters = [c for c in clusters if c]
    if not clusters:
        return EdgePlan([], {}, [], 0.0, 0.0, method)
    terms, members, rows = _terms(space, edge, clusters, options)
    if isinstance(shares, str):
        t, s = optimal_shares(terms) if shares == "optimal" else equal_shares(terms)
    else:
        s = np.asarray(shares, dtype=float)
        t = float(terms.cluster_times(s).max())
    _, best = terms.member_times(s)
    blocks = {d.device_id: options[d.device_id][min(b, len(options[d.device_id]) - 1)]
              for d, b in zip(members, best)}
    energy = sum(rows[i][b].energy_j for i, b in enumerate(best))
    delay = t + edge_overhead_s(space.shape, edge, len(clusters))
    return EdgePlan([[d.device_id for d in c] for c in clusters], blocks, [float(x) for x in s], delay,
                    energy, method)


def member_turns(space: SearchSpace, edge: EdgeProfile, plan: EdgePlan, fleet: Fleet) -> dict[str, float]:
    k = len(plan.clusters)
    return {d: turn_seconds(turn_terms(space.shape, fleet.device(d), edge, plan.blocks[d], k), fleet.device(d),
                            edge, plan.shares[ci])
            for ci, c in enumerate(plan.clusters) for d in c}


# ---------------------------------------------------------------------------------- exact
def set_partitions(items: list, max_blocks: int | None = None, block_size: int | None = None):
    """Every partition of ``items`` into blocks (restricted growth strings), optionally with at
    most ``max_blocks`` blocks, or only blocks of at most ``block_size`` with the fewest blocks
    that allows."""
    n = len(items)
    if n == 0:
        return
    want = math.ceil(n / block_size) if block_size else None

    def grow(i: int, blocks: list[list]):
        if i == n:
            if want is None or len(blocks) == want:
                yield [list(b) for b in blocks]
            return
        for b in blocks:
            if block_size is None or len(b) < block_size:
                b.append(items[i])
                yield from grow(i + 1, blocks)
                b.pop()
        if (max_blocks is None or len(blocks) < max_blocks) and (want is None or len(blocks) < want):
            blocks.append([items[i]])
            yield from grow(i + 1, blocks)
            blocks.pop()

    yield from grow(0, [])


def bell(n: int) -> int:
    row = [1]
    for _ in range(n):
        nxt = [row[-1]]
        for x in row:
            nxt.append(nxt[-1] + x)
        row = nxt
    return row[0]


def exact_combos(space: SearchSpace, cand: Candidate) -> int:
    cuts = 1 if space.energy_weight == 0 else math.prod(len(o) for o in cand.options.values())
    return bell(len(cand.devices)) * cuts


def exact_edge(space: SearchSpace, edge: EdgeProfile, cand: Candidate) -> list[EdgePlan]:
    """Every clustering (and, with an energy weight, every cut choice) of the edge: the Pareto
    front of (delay, energy)."""
    out = []
    limit = space.max_clusters
    for parts in set_partitions(cand.devices, limit, space.cluster_size):
        if space.energy_weight == 0:
            out.append(evaluate_edge(space, edge, parts, cand.options, method="exact"))
            continue
        ids = [d.device_id for d in cand.devices]
        for choice in itertools.product(*(cand.options[i] for i in ids)):
            out.append(evaluate_edge(space, edge, parts, {i: [b] for i, b in zip(ids, choice)}, method="exact"))
    return pareto(out)


def pareto(plans: list[EdgePlan]) -> list[EdgePlan]:
    front, best_e = [], math.inf
    for p in sorted(plans, key=lambda p: (p.delay_s, p.energy_j)):
        if p.energy_j < best_e - 1e-12:
            front.append(p)
            best_e = p.energy_j
    return front


# ------------------------------------------------------------------------------ heuristic
def lpt_clusters(devices: list[DeviceProfile], loads: dict[str, float], k: int,
                 capacity: int | None) -> list[list[DeviceProfile]]:
    """Longest load first into the least-loaded cluster with room (``capacity``: members at most)."""
    clusters: list[list[DeviceProfile]] = [[] for _ in range(k)]
    total = [0.0] * k
    for d in sorted(devices, key=lambda d: (-loads[d.device_id], d.device_id)):
        open_ = [i for i in range(k) if capacity is None or len(clusters[i]) < capacity]
        i = min(open_, key=lambda i: (total[i], i))
        clusters[i].append(d)
        total[i] += loads[d.device_id]
    # within a cluster, the shorter turns first (the edge's pipeline starts sooner)
    return [sorted(c, key=lambda d: (loads[d.device_id], d.device_id)) for c in clusters if c]


def _best_cut(space: SearchSpace, d: DeviceProfile, edge: EdgeProfile, opts: list[int], k: int, share: float,
              weight: float) -> int:
    """The device's cut scoring its own turn + ``weight`` x its energy (inf: energy alone)."""
    def score(b: int) -> tuple[float, float]:
        t = turn_terms(space.shape, d, edge, b, k)
        seconds = turn_seconds(t, d, edge, share)
        return (t.energy_j, seconds) if math.isinf(weight) else (seconds + weight * t.energy_j, t.energy_j)

    return min(opts, key=score)


def heuristic_edge(space: SearchSpace, edge: EdgeProfile, cand: Candidate) -> list[EdgePlan]:
    """One plan per cluster count tried (see the module doc)."""
    n = len(cand.devices)
    if space.cluster_size:
        counts = [math.ceil(n / space.cluster_size)]
    else:
        top = min(n, space.max_clusters or n)
        counts = sorted({k for k in range(1, min(top, MAX_HEURISTIC_K) + 1)}
                        | {math.ceil(n / s) for s in range(1, MAX_HEURISTIC_K + 1) if math.ceil(n / s) <= top})
    # a device's own turn time is not the round's: with an energy weight, also try the cuts chosen
    # for time alone and for energy alone, and let the round's objective decide
    weights = [0.0] if space.energy_weight == 0 else [0.0, space.energy_weight, math.inf]
    plans = []
    for k, w in itertools.product(counts, weights):
        capacity = space.cluster_size
        cuts = {d.device_id: _best_cut(space, d, edge, cand.options[d.device_id], k, 1.0 / k, w) for d in cand.devices}
        loads = {d.device_id: turn_seconds(turn_terms(space.shape, d, edge, cuts[d.device_id], k), d, edge, 1.0 / k)
                 for d in cand.devices}
        clusters = lpt_clusters(cand.devices, loads, k, capacity)
        plan = evaluate_edge(space, edge, clusters, {i: [b] for i, b in cuts.items()}, method="heuristic")
        share_of = {d: plan.shares[ci] for ci, c in enumerate(plan.clusters) for d in c}
        cuts = {d.device_id: _best_cut(space, d, edge, cand.options[d.device_id], len(clusters),
                                       share_of[d.device_id], w) for d in cand.devices}
        again = evaluate_edge(space, edge, clusters, {i: [b] for i, b in cuts.items()}, method="heuristic")
        plans.extend([plan, again])
    return pareto(plans)


# -------------------------------------------------------------------------------- combine
def combine(space: SearchSpace, per_edge: dict[str, list[EdgePlan]]) -> tuple[dict[str, EdgePlan], float]:
    """Each edge's plan minimizing max over edges of delay + the cloud's share + w x total energy:
    for each candidate round delay, each edge's least-energy plan within it (exact for the
    candidates given)."""
    per_edge = {e: ps for e, ps in per_edge.items() if ps}
    if not per_edge:
        return {}, 0.0
    cloud = cloud_overhead_s(space.shape, space.fleet, len(per_edge))
    best, best_obj = None, math.inf
    for t in sorted({p.delay_s for ps in per_edge.values() for p in ps}):
        chosen = {}
        for e, ps in per_edge.items():
            ok = [p for p in ps if p.delay_s <= t + 1e-12]
            if not ok:
                break
            chosen[e] = min(ok, key=lambda p: (p.energy_j, p.delay_s))
        else:
            delay = max(p.delay_s for p in chosen.values()) + cloud
            obj = delay + space.energy_weight * sum(p.energy_j for p in chosen.values())
            if obj < best_obj - 1e-12:
                best, best_obj = chosen, obj
    return best, best_obj


def search(space: SearchSpace, candidates: dict[str, Candidate],
           force: str | None = None) -> tuple[dict[str, EdgePlan], float]:
    """The optimized plan of every edge. ``force``: "exact" or "heuristic" for every edge."""
    per_edge = {}
    for e, cand in candidates.items():
        if not cand.devices:
            per_edge[e] = []
            continue
        edge = space.fleet.edge(e)
        use_exact = force == "exact" or (force is None and exact_combos(space, cand) <= space.exact_max_combos)
        per_edge[e] = exact_edge(space, edge, cand) if use_exact else heuristic_edge(space, edge, cand)
    return combine(space, per_edge)
