"""Where each tier runs: the custom Ray resource a tier's actors and Serve replicas ask for, and the
ONE function that computes what one of them asks of Ray (``resource_shape``).

A node plays a tier by declaring its resource (``ray start --resources='{"gaisnet_edge": 4}'``;
local dev mode declares them on its single node) and, if the config pins the tier further, the
labels ``topology.<tier>.node_labels`` asks for. Everything that places or sizes tier work reads
the shape from here: the training actors (``actors.tier_options``), the Serve deployments
(``serve.app.deployment_options``), local dev mode's node (``cluster.local.required_resources``)
and the cluster pre-check (``cluster.preflight.demands``) - so they cannot disagree.

Core module: no Ray, no imports at run time (the config tree imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .config import Config, TopologyConfig

TIERS = ("cloud", "edge", "end")
TIER_RESOURCES = {"cloud": "gaisnet_cloud", "edge": "gaisnet_edge", "end": "gaisnet_end"}

# Share of its tier resource each Serve replica asks for: a node declaring ``gaisnet_edge: 1`` hosts
# up to 100 edge replicas, a node declaring none hosts none (placement by tier, as for the actors,
# whose share is a whole unit: one actor per declared unit).
SERVE_REPLICA_SHARE = 0.01


@dataclass(frozen=True)
class ResourceShape:
    """What ONE actor or Serve replica asks of Ray."""

    tier: str | None  # "cloud" | "edge" | "end"; None: no tier (the HTTP ingress goes anywhere)
    units: float  # of the tier's custom resource
    num_cpus: float
    num_gpus: float
    labels: dict[str, str] = field(default_factory=dict)  # Ray label_selector; {}: the resource alone decides

    @property
    def resources(self) -> dict[str, float]:
        return {TIER_RESOURCES[self.tier]: self.units} if self.tier else {}

    def ray_options(self) -> dict:
        """``.options(...)`` of an actor, or a deployment's ``ray_actor_options``."""
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            opts["resources"] = self.resources
        if self.labels:  # Ray's label-based scheduling: only nodes started with these labels qualify
            opts["label_selector"] = dict(self.labels)
        return opts

    def demand(self) -> dict[str, float]:
        """The resources as one dict (tier resource, ``CPU``, ``GPU``), as ``ray.nodes()`` declares them."""
        return {**self.resources, "CPU": self.num_cpus, "GPU": self.num_gpus}


def resource_shape(tier: str | None, res, share: float = 1.0, labels: Mapping[str, str] | None = None) -> ResourceShape:
    """The shape of one actor or replica of ``tier``: ``share`` of the tier resource (1 for an actor,
    ``SERVE_REPLICA_SHARE`` for a replica), ``res.num_cpus`` / ``res.num_gpus`` (``res``: a
    ``TierResources`` or a ``ServeTier``), and ``labels`` (default: ``res.node_labels``, if it has them)."""
    if tier is not None and tier not in TIER_RESOURCES:
        raise ValueError(f"unknown tier {tier!r}; tiers are {', '.join(TIERS)}")
    if labels is None:
        labels = getattr(res, "node_labels", None) or {}
    return ResourceShape(tier, share if tier else 0.0, res.num_cpus, res.num_gpus, dict(labels))


def tier_labels(topology: "TopologyConfig") -> dict[str, dict[str, str]]:
    """``topology.<tier>.node_labels`` of every tier: the nodes that play a tier host both its actors
    and its Serve replicas."""
    return {t: dict(getattr(topology, t).node_labels) for t in TIERS}


@dataclass(frozen=True)
class Placement:
    """One kind of actor or replica a run places: how many, and the shape of each."""

    what: str  # e.g. "edge actor", "cloud Serve replica"
    count: int
    shape: ResourceShape


def serve_placements(serve, labels: Mapping[str, Mapping[str, str]] | None = None) -> list[Placement]:
    """The Serve deployments' replicas (``serve``: the ``serve:`` section), the tiers placed on their
    tier's nodes (``labels``: ``tier_labels``; default: the resource alone decides)."""
    labels = labels or {}
    out = [Placement("ingress Serve replica", serve.ingress.num_replicas, resource_shape(None, serve.ingress))]
    for tier in TIERS:
        rep = getattr(serve, tier)
        out.append(Placement(f"{tier} Serve replica", rep.num_replicas,
                             resource_shape(tier, rep, SERVE_REPLICA_SHARE, labels.get(tier, {}))))
    return out


def placements(cfg: "Config", training: bool = True, serving: bool = False) -> list[Placement]:
    """Everything a run places on Ray: the training actors (one CloudNode and ``cloud.workers - 1``
    CloudWorkers, one EdgeNode per edge, the EndWorker pool or one EndNode per device) when
    ``training``, the Serve replicas when ``serving``."""
    t = cfg.topology
    out: list[Placement] = []
    if training:
        counts = {"cloud": cfg.cloud.workers, "edge": t.edges, "end": t.end_pool or t.num_devices}
        out += [Placement(f"{tier} actor", counts[tier], resource_shape(tier, getattr(t, tier))) for tier in TIERS]
    if serving:
        out += serve_placements(cfg.serve, tier_labels(t))
    return out


def resolve_end_pool(cfg: "Config", cluster: bool = False) -> "Config":
    """``cfg`` with ``topology.end_workers: auto`` replaced by what it means where the run places
    its actors: on a cluster (``cluster``) each end device is a machine placed by the ``gaisnet_end``
    resource, so one actor per device; in local dev mode a pool sized to this host's CPUs
    (``TopologyConfig.end_pool``), read now, once. Any other value is kept."""
    if cfg.topology.end_workers != "auto":
        return cfg
    pool = None if cluster else cfg.topology.end_pool
    return cfg.model_copy(update={"topology": cfg.topology.model_copy(update={"end_workers": pool})})


def on_cluster(cfg: "Config") -> "Config":
    """``cfg`` as a run that joins a cluster places it (``resolve_end_pool`` with ``cluster``)."""
    return resolve_end_pool(cfg, cluster=True)


def total_demand(placed: list[Placement]) -> dict[str, float]:
    """Every tier resource, ``CPU`` and ``GPU`` the placements ask for in all (fractions kept)."""
    need = {**{TIER_RESOURCES[t]: 0.0 for t in TIERS}, "CPU": 0.0, "GPU": 0.0}
    for p in placed:
        for key, amount in p.shape.demand().items():
            need[key] += p.count * amount
    return need
