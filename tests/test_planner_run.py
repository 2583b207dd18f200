"""A planned run on Ray: the plan's cuts and clusters reach the actors, the run folder records the
plan, the metrics put the modeled round beside the measured one, and the Ray run learns exactly
what the in-process runtime learns under the same plan."""

from __future__ import annotations

import json

import pytest
import torch

from gaisnet_ray.config import load_config
from tinycfg import TINY_YAML

PLANNED = [
    "topology.edges=2", "topology.devices_per_edge=3", "topology.end_workers=2", "run.actor_timeout_s=180",
    "topology.planner=optimized", "planner.fleet=classes",
    "planner.host_gflops=20", "planner.edge_gflops=5", "data.samples_per_device=24",
    "data.eval_samples_per_domain=2", "data.public_samples=32", "training.pretrain_steps=0",
    "training.local_steps=2", "training.batch_size=8", "training.rounds=2", "training.eval_every=10",
    "run.progress=false",
]


@pytest.mark.ray
def test_a_planned_ray_run_follows_the_plan_and_equals_the_inprocess_run(ray_local, tmp_path):
    import ray

    from gaisnet_ray.driver import GaisNetDriver
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.knowledge import KnowledgeStore

    cfg = load_config(TINY_YAML, PLANNED)
    driver = GaisNetDriver(cfg, tmp_path / "ray")
    plan = driver.run_plan.plan
    assert plan.name == "optimized" and any(sum(c) > 2 for c in plan.cuts.values())  # a slow edge: big cuts
    driver.start()
    try:
        rows = [driver.run_round(r) for r in (1, 2)]
        # asked of the live actors: an edge holds exactly the blocks its devices' cuts leave it (mixed
        # cuts here), no embedding, no head, and adapter keys for those blocks only (issue 16)
        n = driver.num_layers
        for e, actor in driver.edges.items():
            held = ray.get(actor.holdings.remote())
            mine = {d: c for d, c in plan.cuts.items() if d.startswith(f"end-{e.split('-')[1]}-")}
            blocks = sorted(set().union(*(range(f, n - b) for f, b in mine.values())))
            assert held["blocks"] == held["adapter_blocks"] == blocks, (e, held, mine)
            assert not held["embeddings"] and not held["head"] and not held["adapter_other_keys"]
            assert 0 < held["foundation_values"]
    finally:
        driver.close()
    recorded = json.loads((tmp_path / "ray" / "plan.json").read_text())
    assert recorded["plan"]["clusters"] == plan.clusters and recorded["host_gflops"] == 20
    for m in rows:
        assert [c for cs in m["clusters"].values() for c in cs] == [c for cs in plan.clusters.values() for c in cs]
        assert m["plan"]["planner"] == "optimized" and m["plan"]["emulated"] is False
        assert m["plan"]["modeled_round_s"] > 0 and m["plan"]["measured_train_s"] > 0

    torch.set_num_threads(1)
    reference = InProcessGaisNet(cfg, tmp_path / "inproc")
    assert reference.run_plan.plan.cuts == plan.cuts
    for r in (1, 2):
        reference.run_round(r)
    got, want = KnowledgeStore(tmp_path / "ray" / "knowledge"), KnowledgeStore(tmp_path / "inproc" / "knowledge")
    for v in (1, 2):
        a, b = got.load(v), want.load(v)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"v{v} {k}")
