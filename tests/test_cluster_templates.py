"""The deploy/ templates (issue 5): the cluster launcher's and KubeRay's YAML parse and give each tier
node type exactly its tier resource and label; the RayService builds the gaisnet app. No Ray runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from gaisnet_ray.config import load_config
from gaisnet_ray.tiers import TIER_RESOURCES

from tinycfg import TINY_YAML

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
TIER_LABEL = "gaisnet/tier"


def _tier_of(labels: dict | None) -> str | None:
    return (labels or {}).get(TIER_LABEL)


def _gaisnet_resources(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if k.startswith("gaisnet_")}


def test_cluster_launcher_template_declares_one_tier_per_node_type():
    import importlib.resources

    import jsonschema

    cfg = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    schema = json.loads(importlib.resources.files("ray").joinpath("autoscaler/ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # what `ray up` validates first
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert _gaisnet_resources(head["resources"]) == {}  # no tier actor on the head
    tiers = {}
    for name, nt in types.items():
        if name == cfg["head_node_type"]:
            continue
        tier = _tier_of(nt.get("labels"))
        assert tier in TIER_RESOURCES, (name, nt.get("labels"))
        assert set(_gaisnet_resources(nt["resources"])) == {TIER_RESOURCES[tier]}, name
        assert nt["resources"][TIER_RESOURCES[tier]] >= 1
        tiers[tier] = nt
    assert set(tiers) == set(TIER_RESOURCES)
    assert tiers["cloud"]["resources"].get("GPU", 0) >= 1
    # the default config fits the nodes kept up (min_workers): the pre-check passes at once
    need = load_config(TINY_YAML).topology
    have = {t: nt["resources"][TIER_RESOURCES[t]] * nt.get("min_workers", 0) for t, nt in tiers.items()}
    assert have["cloud"] >= 1 and have["edge"] >= need.edges and have["end"] >= need.num_devices
    assert sum(nt.get("max_workers", 0) for nt in tiers.values()) <= cfg["max_workers"]


def _group_tier(group: dict) -> tuple[str | None, dict]:
    params = group.get("rayStartParams", {})
    labels = dict(kv.split("=", 1) for kv in params.get("labels", "").split(",") if kv)
    raw = params.get("resources")
    # KubeRay's format: a JSON object inside a quoted string, passed to `ray start --resources=`
    resources = json.loads(json.loads(raw)) if raw else {}
    return _tier_of(labels), resources


def _check_kuberay_cluster(spec: dict) -> dict:
    head_tier, head_res = _group_tier(spec["headGroupSpec"])
    assert head_tier is None and _gaisnet_resources(head_res) == {}
    tiers = {}
    for g in spec["workerGroupSpecs"]:
        tier, res = _group_tier(g)
        assert tier in TIER_RESOURCES, g["groupName"]
        assert set(_gaisnet_resources(res)) == {TIER_RESOURCES[tier]}, g["groupName"]
        tiers[tier] = (g, res)
    assert set(tiers) == set(TIER_RESOURCES)
    cloud_group = tiers["cloud"][0]
    assert cloud_group["rayStartParams"].get("num-gpus") == "1"
    assert cloud_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    return tiers


def test_kuberay_raycluster_has_a_worker_group_per_tier():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "raycluster.yaml").read_text()) if d]
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["spec"]["rayVersion"] == "2.60.0"
    tiers = _check_kuberay_cluster(cluster["spec"])
    need = load_config(TINY_YAML).topology
    have = {t: res[TIER_RESOURCES[t]] * g["minReplicas"] for t, (g, res) in tiers.items()}
    assert have["cloud"] >= 1 and have["edge"] >= need.edges and have["end"] >= need.num_devices
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        vols = group["template"]["spec"]["volumes"]
        assert {v["persistentVolumeClaim"]["claimName"] for v in vols} <= claims  # shared run folders


def test_kuberay_rayservice_builds_the_gaisnet_app():
    from gaisnet_ray.serve.app import AppArgs
    from gaisnet_ray.config import ServeSettings

    svc = yaml.safe_load((DEPLOY / "kuberay" / "rayservice.yaml").read_text())
    assert svc["kind"] == "RayService" and svc["apiVersion"] == "ray.io/v1"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    reference = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())["applications"][0]
    assert app["import_path"] == reference["import_path"] == "gaisnet_ray.serve.app:app_builder"
    args = AppArgs.model_validate(app["args"])  # what app_builder accepts
    settings = ServeSettings.model_validate(args.settings)
    assert args.run_dir.startswith("/")
    assert settings.cloud.num_gpus == 1
    _check_kuberay_cluster(svc["spec"]["rayClusterConfig"])
