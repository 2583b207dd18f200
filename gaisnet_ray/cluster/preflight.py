"""Before anything is placed on an existing Ray cluster: can it ever hold this run?

An actor asking for a resource no node declares stays pending forever, so without this check a
missing ``gaisnet_edge`` on a real cluster looks like a hang until ``run.actor_timeout_s``. Pure
functions over ``ray.nodes()`` rows (``Alive``, ``Resources``, ``Labels``), so tests need no Ray.

Two checks, both on what the nodes *declare* (totals, not what is free right now):

- totals: every tier resource, CPU and GPU the run asks for in all (``required_resources``);
- shapes: for each tier, at least one node that can hold one of its actors (or Serve replicas):
  the tier resource together with that actor's CPUs and GPUs, and the tier's ``node_labels``.

Fragmentation beyond that (every actor fits some node, but not all at once) is still caught by
the driver's placement timeout.

Memory (``memory_problems``): each actor's estimated peak (``hfsl.memory``) must find room on a
node that declares its tier resource; a node's room is the memory it had free when it joined
(Ray's ``memory`` + ``object_store_memory`` resources) times Ray's memory-monitor threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..config import Config
from ..hfsl.memory import (GB, InsufficientMemoryError, JobEstimate, estimate_job, model_config_of, monitor_threshold,
                           refusal_message)
from ..tiers import TIER_RESOURCES, placements


@dataclass(frozen=True)
class Demand:
    """One kind of actor a run places: what one of them asks for, and where it may go."""

    what: str  # e.g. "edge actor", "cloud Serve replica"
    tier: str
    shape: dict[str, float]  # resource -> amount for ONE actor or replica
    labels: dict[str, str] = field(default_factory=dict)


def demands(cfg: Config, training: bool = True, serving: bool = False) -> list[Demand]:
    """One ``Demand`` per kind of actor or Serve replica that has a tier (``tiers.placements``: the
    shapes the actors and deployments really ask for; the ingress goes anywhere and is not checked)."""
    return [Demand(p.what, p.shape.tier, p.shape.demand(), dict(p.shape.labels))
            for p in placements(cfg, training, serving) if p.shape.tier is not None]


def _alive(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def label_matches(node_labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Ray's label_selector semantics for one node: ``value``, ``!value``, ``in(a,b)``, ``!in(a,b)``."""
    for key, want in selector.items():
        have = node_labels.get(key)
        negate = want.startswith("!")
        body = want[1:] if negate else want
        if body.startswith("in(") and body.endswith(")"):
            ok = have in {v.strip() for v in body[3:-1].split(",")}
        else:
            ok = have == body
        if ok == negate:
            return False
    return True


def _fits(node: dict, demand: Demand) -> bool:
    res = node.get("Resources", {})
    return (all(res.get(k, 0.0) >= v for k, v in demand.shape.items() if v > 0)
            and label_matches(node.get("Labels", {}) or {}, demand.labels))


def _fmt(x: float) -> str:
    return f"{x:g}"


def placement_problems(need: dict[str, float], wanted: list[Demand], nodes: list[dict]) -> list[str]:
    """What keeps this cluster from ever placing the run; [] when nothing does.

    ``need``: the totals (``cluster.required_resources``); ``wanted``: one ``Demand`` per actor kind.
    """
    nodes = _alive(nodes)
    problems: list[str] = []
    declared = {k: sum(n.get("Resources", {}).get(k, 0.0) for n in nodes) for k in need}
    for key, amount in need.items():
        if amount > 0 and declared[key] + 1e-9 < amount:
            holders = sum(1 for n in nodes if n.get("Resources", {}).get(key, 0.0) > 0)
            problems.append(f"{key}: the run needs {_fmt(amount)}, the cluster declares {_fmt(declared[key])}"
                            + (f" (on {holders} node{'s' if holders != 1 else ''})" if holders else ""))
    short = {p.split(":", 1)[0] for p in problems}
    for d in wanted:
        tier_res = TIER_RESOURCES[d.tier]
        if tier_res in short or any(_fits(n, d) for n in nodes):
            continue
        with_tier = [n for n in nodes if n.get("Resources", {}).get(tier_res, 0.0) > 0]
        asks = ", ".join(f"{k} {_fmt(v)}" for k, v in d.shape.items() if v > 0)
        if not with_tier:
            why = f"no node declares {tier_res}"
        elif d.labels and not any(label_matches(n.get("Labels", {}) or {}, d.labels) for n in with_tier):
            why = (f"no node declaring {tier_res} has the labels topology.{d.tier}.node_labels asks for "
                   f"({', '.join(f'{k}={v}' for k, v in d.labels.items())})")
        else:
            why = f"no node declaring {tier_res} also has what one asks for"
        problems.append(f"a {d.what} ({asks}"
                        + (f"; labels {d.labels}" if d.labels else "") + f") fits no node: {why}")
    return problems


def resource_error_message(address: str, need: dict[str, float], problems: list[str], nodes: list[dict]) -> str:
    nodes = _alive(nodes)
    lines = [f"the Ray cluster at {address} cannot place this run:"]
    lines += [f"  - {p}" for p in problems]
    tiers = {v: k for k, v in TIER_RESOURCES.items()}
    head = address if "://" not in address and address != "auto" else "<head>:6379"
    examples = []
    for res_name, tier in tiers.items():
        have = sum(n.get("Resources", {}).get(res_name, 0.0) for n in nodes)
        if need.get(res_name, 0) > have or any(res_name in p and "fits no node" in p for p in problems):
            units = json.dumps({res_name: int(need[res_name])})
            examples.append(f"    ray start --address={head} --resources='{units}' --labels='gaisnet/tier={tier}'"
                            f"   # on the {tier} machine(s): {int(need[res_name])} in all")
    if examples:
        lines.append("Declare each tier's resource on the nodes that play that tier, e.g.")
        lines += examples
    lines.append("(docs/cluster.md; deploy/cluster.yaml and deploy/kuberay/ declare them per node type). "
                 "If such nodes start on demand (autoscaling), keep enough of them up (min_workers / "
                 "minReplicas) or pass --no-resource-check.")
    lines.append("Nodes now: " + "; ".join(
        "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in sorted(n.get("Resources", {}).items())
                        if k in ("CPU", "GPU") or k in tiers) + "}" for n in nodes))
    return "\n".join(lines)


def _node_room(node: dict, threshold: float) -> float:
    """Bytes a node lets the run use: the memory it had free when it joined (Ray's ``memory`` and
    ``object_store_memory`` resources) times the memory monitor's threshold."""
    res = node.get("Resources", {})
    return (res.get("memory", 0.0) + res.get("object_store_memory", 0.0)) * threshold


def memory_problems(estimate: JobEstimate, nodes: list[dict], threshold: float = 0.95) -> list[str]:
    """[] when every actor's estimated peak fits some placement on the live nodes (largest actors
    first, each on the node declaring its tier resource with the most room left); else what did not."""
    nodes = _alive(nodes)
    room = [_node_room(n, threshold) for n in nodes]
    units = [dict(n.get("Resources", {})) for n in nodes]
    problems: list[str] = []
    for a in sorted(estimate.actors, key=lambda a: -a.peak_bytes):
        res = TIER_RESOURCES[a.kind]
        for placed in range(a.count):
            hosts = [i for i in range(len(nodes)) if units[i].get(res, 0.0) >= 1.0]
            best = max(hosts, key=lambda i: room[i], default=None)
            if best is None or room[best] < a.peak_bytes:
                most = max((room[i] for i in hosts), default=0.0)
                problems.append(f"{a.kind} actor {placed + 1} of {a.count} needs about {a.peak_bytes / GB:.2f} GB; "
                                f"the most memory left on a node declaring {res} is {most / GB:.2f} GB")
                break
            room[best] -= a.peak_bytes
            units[best][res] -= 1.0
    return problems


def memory_error_message(address: str, estimate: JobEstimate, problems: list[str], nodes: list[dict],
                         threshold: float = 0.95) -> str:
    nodes = _alive(nodes)
    have = sum(_node_room(n, threshold) for n in nodes)
    where = f"the Ray cluster at {address} ({len(nodes)} node(s), {have / GB:.1f} GB usable in all)"
    return refusal_message(estimate, problems, where)


def check_cluster_memory(cfg: Config, nodes: list[dict] | None = None, address: str = "the cluster",
                         model_config: dict | None = None) -> JobEstimate:
    """Raise ``InsufficientMemoryError`` (with the numbers) unless the run's estimated peak memory
    fits the live nodes (``nodes``: ``ray.nodes()`` rows; default: the connected cluster's)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    estimate = estimate_job(cfg, model_config if model_config is not None else model_config_of(cfg), local=False)
    threshold = monitor_threshold()
    problems = memory_problems(estimate, nodes, threshold)
    if problems:
        raise InsufficientMemoryError(memory_error_message(address, estimate, problems, nodes, threshold))
    return estimate
