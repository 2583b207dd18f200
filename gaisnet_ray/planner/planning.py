"""Plans of one round, whole: cuts, clusters and shares of every edge, their modeled delay, energy
and memory, and the alternatives ``gaisnet plan`` puts next to each other.

- ``fixed``: today's behaviour: the configured cuts and clustering (``topology.clustering`` over
  the devices' data sizes and ``topology.device_compute``), equal bandwidth shares.
- ``sequential``: the configured cuts, devices in id order, equal shares.
- ``balanced``: the configured cuts, clusters of ``topology.cluster_size`` balanced by the
  devices' modeled turn times (LPT), equal shares.
- ``optimized``: cuts within memory, clusters and shares searched (``planner.search``).
- ``cluster_size=k``: optimized with clusters of k.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from ..config import Config, ConfigError
from ..schemes.plan import plan_clusters
from ..schemes.topology import devices_by_edge
from ..schemes import SCHEMES, scheme_of
from .cost import RoundShape, cloud_overhead_s, split_blocks, turn_seconds, turn_terms
from .profiles import Fleet
from .search import Candidate, EdgePlan, SearchSpace, evaluate_edge, lpt_clusters, member_turns, search


class PlanError(ValueError):
    """The round cannot be planned (a scheme without a cut, no device can train)."""

    @staticmethod
    def no_cut(scheme: str) -> str:
        planned = " and ".join(n for n, s in SCHEMES.items() if s.splits)
        return (f"training.scheme '{scheme}' trains the whole model on each device: there is no cut to plan "
                f"(the planner plans {planned})")


@dataclass
class RoundPlan:
    name: str
    cuts: dict[str, tuple[int, int]]  # trained device -> (front_layers, back_layers)
    clusters: dict[str, list[list[str]]]  # edge -> clusters of device ids in training order
    shares: dict[str, list[float]]  # edge -> each cluster's share of its link to its devices
    delay_s: float  # modeled round delay
    objective: float  # delay + energy_weight x total device energy
    edge_delay_s: dict[str, float]
    turn_s: dict[str, float]
    energy_j: dict[str, float]  # per trained device, one round
    memory_bytes: dict[str, int]  # per device, its peak with its cut
    excluded: dict[str, str] = field(default_factory=dict)  # device -> why it cannot train
    over_memory: list[str] = field(default_factory=list)  # trained devices whose cut exceeds their memory
    methods: dict[str, str] = field(default_factory=dict)
    planning_s: float = 0.0

    @property
    def total_energy_j(self) -> float:
        return sum(self.energy_j.values())

    def to_dict(self) -> dict:
        out = asdict(self)
        out["cuts"] = {d: {"front_layers": f, "back_layers": b} for d, (f, b) in self.cuts.items()}
        out["total_energy_j"] = self.total_energy_j
        return out

    def summary(self) -> dict:
        sizes = sorted({len(c) for cs in self.clusters.values() for c in cs})
        mem = max(self.memory_bytes.values(), default=0)
        return {"plan": self.name, "delay_s": round(self.delay_s, 3), "energy_j": round(self.total_energy_j, 2),
                "max_device_energy_j": round(max(self.energy_j.values(), default=0.0), 2),
                "max_device_memory_gb": round(mem / 1e9, 3),
                "clusters": sum(len(cs) for cs in self.clusters.values()), "cluster_sizes": sizes,
                "excluded": len(self.excluded), "planning_s": round(self.planning_s, 3)}


def _configured_blocks(cfg: Config, shape: RoundShape) -> dict[str, tuple[int, int]]:
    out = {}
    n = shape.num_layers
    for ds in devices_by_edge(cfg.topology).values():
        for d in ds:
            c = cfg.topology.cut_for(d)
            if c.front_layers + c.back_layers >= n:
                key = f"topology.device_cuts.{d}" if d in cfg.topology.device_cuts else "topology.cut"
                raise ConfigError(f"invalid value for '{key}': front_layers={c.front_layers} + back_layers="
                                  f"{c.back_layers} leaves no block for the edge: the model has {n} blocks")
            out[d] = (c.front_layers, c.back_layers)
    return out


def _space(cfg: Config, shape: RoundShape, fleet: Fleet, cluster_size: int | None = None) -> SearchSpace:
    return SearchSpace(shape, fleet, cfg.planner.energy_weight, cfg.planner.exact_max_combos,
                       scheme_of(cfg).max_clusters, cluster_size)


def _finish(name: str, cfg: Config, shape: RoundShape, fleet: Fleet, space: SearchSpace,
            plans: dict[str, EdgePlan], cuts: dict[str, tuple[int, int]], excluded: dict[str, str],
            started: float) -> RoundPlan:
    edges = {e: p for e, p in plans.items() if p.clusters}
    delay = max((p.delay_s for p in edges.values()), default=0.0) + cloud_overhead_s(shape, fleet, len(edges))
    turns, energy = {}, {}
    for e, p in edges.items():
        edge = fleet.edge(e)
        turns.update(member_turns(space, edge, p, fleet))
        k = len(p.clusters)
        energy.update({d: turn_terms(shape, fleet.device(d), edge, p.blocks[d], k).energy_j
                       for c in p.clusters for d in c})
    trained = {d for p in edges.values() for c in p.clusters for d in c}
    cuts = {d: cuts[d] if d in cuts else split_blocks(p.blocks[d]) for p in edges.values() for d in p.blocks}
    memory = {d.device_id: shape.device_memory(sum(cuts[d.device_id])) for d in fleet.devices if d.device_id in cuts}
    over = sorted(d for d in trained if (m := fleet.device(d).memory_bytes) is not None and memory[d] > m)
    total_e = sum(energy.values())
    return RoundPlan(name, {d: cuts[d] for d in sorted(trained)}, {e: p.clusters for e, p in edges.items()},
                     {e: p.shares for e, p in edges.items()}, delay, delay + cfg.planner.energy_weight * total_e,
                     {e: p.delay_s for e, p in edges.items()}, turns, energy, memory, excluded, over,
                     {e: p.method for e, p in edges.items()}, time.perf_counter() - started)


def _candidates(shape: RoundShape, fleet: Fleet,
                given: dict[str, tuple[int, int]] | None) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Each edge's trainable devices and their cut options; the devices excluded, and why."""
    out, excluded = {}, {}
    for e, devs in fleet.by_edge().items():
        ok, options = [], {}
        for d in devs:
            top = shape.max_blocks_within(d.memory_bytes)
            need = shape.device_memory(sum(given[d.device_id]) if given else shape.min_device_blocks)
            if top is None or (given and sum(given[d.device_id]) > top):
                excluded[d.device_id] = (f"its memory ({d.memory_bytes / 1e9:.2f} GB) cannot hold "
                                         f"{'its configured cut' if given else 'the smallest cut'} "
                                         f"({need / 1e9:.2f} GB); it does not train (it can still be served)")
                continue
            ok.append(d)
            options[d.device_id] = [sum(given[d.device_id])] if given else sorted({shape.min_device_blocks, top})
        out[e] = Candidate(ok, options)
    return out, excluded


def fixed_plan(cfg: Config, shape: RoundShape, fleet: Fleet, sample_counts: dict[str, int] | None = None,
               clustering: str | None = None, name: str = "fixed") -> RoundPlan:
    """The configured cuts and clustering, equal shares: what the runtime does without a planner."""
    started = time.perf_counter()
    cuts = _configured_blocks(cfg, shape)
    if clustering:
        cfg = cfg.model_copy(update={"topology": cfg.topology.model_copy(update={"clustering": clustering})})
    space = _space(cfg, shape, fleet)
    plans = {}
    for e, devs in fleet.by_edge().items():
        counts = {d.device_id: (sample_counts or {}).get(d.device_id, cfg.data.samples_per_device) for d in devs}
        groups = list(plan_clusters(cfg, e, counts).values())
        by_id = {d.device_id: d for d in devs}
        plans[e] = evaluate_edge(space, fleet.edge(e), [[by_id[i] for i in g] for g in groups],
                                 {d: [sum(cuts[d])] for d in counts}, shares="equal", method="given")
    return _finish(name, cfg, shape, fleet, space, plans, cuts, {}, started)


def balanced_plan(cfg: Config, shape: RoundShape, fleet: Fleet) -> RoundPlan:
    """The configured cuts; clusters of ``topology.cluster_size`` balanced by modeled turn time."""
    started = time.perf_counter()
    cuts = _configured_blocks(cfg, shape)
    cands, excluded = _candidates(shape, fleet, cuts)
    space = _space(cfg, shape, fleet)
    plans = {}
    for e, cand in cands.items():
        if not cand.devices:
            continue
        edge = fleet.edge(e)
        size = scheme_of(cfg).cluster_size(cfg, len(cand.devices))
        k = math.ceil(len(cand.devices) / size)
        loads = {d.device_id: turn_seconds(turn_terms(shape, d, edge, cand.options[d.device_id][0], k), d, edge, 1 / k)
                 for d in cand.devices}
        plans[e] = evaluate_edge(space, edge, lpt_clusters(cand.devices, loads, k, size), cand.options, shares="equal",
                                 method="given")
    return _finish("balanced", cfg, shape, fleet, space, plans, cuts, excluded, started)


def optimized_plan(cfg: Config, shape: RoundShape, fleet: Fleet, cluster_size: int | None = None,
                   force: str | None = None) -> RoundPlan:
    started = time.perf_counter()
    cands, excluded = _candidates(shape, fleet, None)
    space = _space(cfg, shape, fleet, cluster_size)
    plans, _ = search(space, cands, force)
    name = "optimized" if cluster_size is None else f"cluster_size={cluster_size}"
    return _finish(name, cfg, shape, fleet, space, plans or {}, {}, excluded, started)


def plan_round(cfg: Config, shape: RoundShape, fleet: Fleet, sample_counts: dict[str, int] | None = None,
               planner: str | None = None) -> RoundPlan:
    """The plan ``topology.planner`` (or ``planner``) picks."""
    if not scheme_of(cfg).splits:
        raise PlanError(PlanError.no_cut(cfg.training.scheme))
    which = planner or cfg.topology.planner
    if which == "fixed":
        plan = fixed_plan(cfg, shape, fleet, sample_counts)
    elif which == "balanced":
        plan = balanced_plan(cfg, shape, fleet)
    else:
        plan = optimized_plan(cfg, shape, fleet)
        fixed = fixed_plan(cfg, shape, fleet, sample_counts)
        if fixed.objective < plan.objective and not fixed.over_memory:  # never worse than today's plan
            fixed.name, fixed.methods = "optimized", {e: "fixed" for e in fixed.methods}
            plan = fixed
    if not plan.clusters:
        first = "; ".join(f"{d}: {why}" for d, why in list(plan.excluded.items())[:3])
        raise PlanError(f"no device can train ({len(plan.excluded)} excluded; planner.devices / planner.classes "
                        f"memory_gb too small for this model): {first}")
    return plan


def alternatives(cfg: Config, shape: RoundShape, fleet: Fleet, sample_counts: dict[str, int] | None = None,
                 max_sizes: int = 8) -> list[RoundPlan]:
    """The fixed, sequential, balanced and optimized plans, and the optimized plan at each cluster
    size (1 .. devices per edge, at most ``max_sizes`` of them)."""
    out = [fixed_plan(cfg, shape, fleet, sample_counts),
           fixed_plan(cfg, shape, fleet, sample_counts, clustering="sequential", name="sequential"),
           balanced_plan(cfg, shape, fleet), plan_round(cfg, shape, fleet, sample_counts, "optimized")]
    if scheme_of(cfg).free_cluster_size:
        n = cfg.topology.devices_per_edge
        sizes = sorted({max(1, round(n * i / max_sizes)) for i in range(1, max_sizes + 1)}) if n > max_sizes \
            else list(range(1, n + 1))
        out += [optimized_plan(cfg, shape, fleet, cluster_size=k) for k in sizes]
    return out


def apply_plan(cfg: Config, plan: RoundPlan) -> Config:
    """``cfg`` with the plan's cuts as ``topology.device_cuts`` (every tier builds what they say)."""
    data = cfg.model_dump()
    base = (cfg.topology.cut.front_layers, cfg.topology.cut.back_layers)
    cuts = dict(data["topology"]["device_cuts"])  # an excluded device keeps its configured cut (served)
    cuts.update({d: {"front_layers": f, "back_layers": b} for d, (f, b) in plan.cuts.items()
                 if (f, b) != base or d in cuts})
    data["topology"]["device_cuts"] = cuts
    return Config.model_validate(data)
