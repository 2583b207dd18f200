"""One resource shape per tier (``tiers.resource_shape``), read by everything that places or sizes
tier work: the training actors, the Serve deployments, local dev mode's node and the cluster
pre-check. No Ray is started; the Serve options are built, not deployed."""

from __future__ import annotations

import pytest
from tinycfg import TINY_YAML

from gaisnet_ray.config import TierResources, load_config
from gaisnet_ray.tiers import (SERVE_REPLICA_SHARE, TIER_RESOURCES, placements, resource_shape, tier_labels,
                               total_demand)

PINNED = [f"topology.{t}.node_labels={{gaisnet/tier: {t}}}" for t in TIER_RESOURCES]


def test_one_shape_gives_the_actor_options_and_the_demand():
    res = TierResources(num_cpus=0.5, num_gpus=0.25, node_labels={"zone": "in(a,b)"})
    shape = resource_shape("edge", res)
    assert shape.ray_options() == {"resources": {"gaisnet_edge": 1.0}, "num_cpus": 0.5, "num_gpus": 0.25,
                                   "label_selector": {"zone": "in(a,b)"}}
    assert shape.demand() == {"gaisnet_edge": 1.0, "CPU": 0.5, "GPU": 0.25}
    assert "label_selector" not in resource_shape("edge", TierResources()).ray_options()
    assert resource_shape(None, res).ray_options() == {"num_cpus": 0.5, "num_gpus": 0.25,
                                                      "label_selector": {"zone": "in(a,b)"}}
    with pytest.raises(ValueError, match="unknown tier 'edges'"):
        resource_shape("edges", res)


def test_actor_options_are_the_shape():
    pytest.importorskip("ray")
    from gaisnet_ray.actors.placement import tier_options

    cfg = load_config(TINY_YAML, PINNED)
    opts = tier_options("end", cfg.topology.end, name="end-0-0")
    assert opts == {"resources": {"gaisnet_end": 1.0}, "num_cpus": cfg.topology.end.num_cpus, "num_gpus": 0.0,
                    "label_selector": {"gaisnet/tier": "end"}, "name": "end-0-0"}


def test_serve_replicas_go_to_their_tiers_labelled_nodes():
    """Serve replicas used to ignore ``topology.<tier>.node_labels``: a pinned tier's replicas could
    land on any node declaring the tier resource. Now they ask for the same labels as the actors."""
    pytest.importorskip("ray")
    from gaisnet_ray.serve.app import deployment_options

    cfg = load_config(TINY_YAML, PINNED)
    s, labels = cfg.serve, tier_labels(cfg.topology)
    edge = deployment_options("edge", s.edge, s, labels["edge"])["ray_actor_options"]
    assert edge == {"resources": {"gaisnet_edge": SERVE_REPLICA_SHARE}, "num_cpus": s.edge.num_cpus,
                    "num_gpus": s.edge.num_gpus, "label_selector": {"gaisnet/tier": "edge"}}
    ingress = deployment_options("ingress", s.ingress, s)["ray_actor_options"]
    assert ingress == {"num_cpus": s.ingress.num_cpus, "num_gpus": s.ingress.num_gpus}  # no tier: anywhere
    assert "label_selector" not in deployment_options("edge", s.edge, s)["ray_actor_options"]


def test_local_mode_and_the_precheck_count_the_same_shapes():
    from gaisnet_ray.cluster.preflight import demands
    from gaisnet_ray.cluster.local import required_resources

    cfg = load_config(TINY_YAML, PINNED + ["topology.end_workers=2", "serve.edge.num_replicas=2"])
    t = cfg.topology
    need = required_resources(cfg, training=True, serving=True)
    assert need["gaisnet_edge"] == t.edges + 1  # 2 edge actors + 2 replicas x 0.01, rounded up
    assert need["gaisnet_end"] == 2 + 1  # the EndWorker pool, not one actor per device
    assert need["CPU"] == pytest.approx(sum(p.count * p.shape.num_cpus for p in placements(cfg, True, True)))
    assert total_demand(placements(cfg, False, True)) == cfg.serve.required_resources()
    wanted = {d.what: d for d in demands(cfg, training=True, serving=True)}
    assert set(wanted) == {f"{t_} {k}" for t_ in TIER_RESOURCES for k in ("actor", "Serve replica")}
    assert wanted["edge Serve replica"].labels == {"gaisnet/tier": "edge"}
    assert wanted["edge Serve replica"].shape == {"gaisnet_edge": SERVE_REPLICA_SHARE, "CPU": cfg.serve.edge.num_cpus,
                                                  "GPU": 0.0}


def test_the_precheck_refuses_serve_replicas_without_their_labelled_node():
    from gaisnet_ray.cluster.local import required_resources
    from gaisnet_ray.cluster.preflight import demands, placement_problems

    cfg = load_config(TINY_YAML, ["topology.edge.node_labels={zone: b}"])
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "gaisnet_cloud": 1, "gaisnet_edge": 4, "gaisnet_end": 8},
              "Labels": {"zone": "a"}}]
    problems = placement_problems(required_resources(cfg, False, True), demands(cfg, False, True), nodes)
    assert len(problems) == 1 and problems[0].startswith("a edge Serve replica") and "zone=b" in problems[0]


def test_a_serve_config_file_places_replicas_by_the_runs_own_labels(tmp_path):
    """``app_builder`` (``serve run``, RayService) has no config tree: it takes the tiers' labels from
    the run folder's config.yaml, so the replicas go where the run's actors went."""
    pytest.importorskip("ray")
    from gaisnet_ray.config import config_to_yaml
    from gaisnet_ray.serve.app import run_tier_labels

    assert run_tier_labels(tmp_path) == {}  # no config.yaml: the tier resource alone decides
    (tmp_path / "config.yaml").write_text(config_to_yaml(load_config(TINY_YAML, PINNED[1:2])))
    assert run_tier_labels(tmp_path) == {"cloud": {}, "edge": {"gaisnet/tier": "edge"}, "end": {}}
    (tmp_path / "config.yaml").write_text("topology: {edgez: 1}\n")
    assert run_tier_labels(tmp_path) == {}  # an unreadable config places by resource, as before


def test_end_workers_auto_pools_the_devices_on_a_small_host_and_not_on_a_cluster(monkeypatch):
    """``auto`` (the default): a pool of one EndWorker per CPU once the devices outnumber this host's
    CPUs (local dev mode), else one actor per device; a run that joins a cluster places one actor per
    device (``tiers.on_cluster``), the resource check counting them so."""
    import os

    from gaisnet_ray.tiers import on_cluster, resolve_end_pool

    cfg = load_config(TINY_YAML, ["topology.end_workers=auto"])  # 2 edges x 3 devices
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cfg.topology.end_pool == 2
    assert resolve_end_pool(cfg).topology.end_workers == 2  # read once: later pinning does not change it
    assert {p.what: p.count for p in placements(cfg)}["end actor"] == 2
    assert on_cluster(cfg).topology.end_pool is None
    assert {p.what: p.count for p in placements(on_cluster(cfg))}["end actor"] == 6
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert cfg.topology.end_pool is None  # a core per device: one actor each, as before the pool
    fixed = load_config(TINY_YAML, ["topology.end_workers=3"])
    assert fixed.topology.end_pool == 3 and on_cluster(fixed) is fixed  # a number is kept everywhere
    assert load_config(TINY_YAML).topology.end_pool is None  # examples/tiny.yaml: null
