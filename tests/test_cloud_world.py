"""A multi-worker cloud world on Ray: two DeepSpeed ranks in two Ray workers.

- Data-parallel steps keep both ranks' parameters identical and equal to one process stepping on
  the two ranks' batches together (mean loss over both = the mean of the per-rank means).
- Each rank ends its world cleanly (barrier, destroy) and the same processes can form a new one.
- The runtime path: a CloudNode with cloud.workers=2 pre-trains and distills with a CloudWorker.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import free_port
from tinycfg import TINY_YAML

pytestmark = pytest.mark.ray

STEPS, B, T = 3, 4, 16


def _model():
    from gaisnet_ray.config import load_config
    from gaisnet_ray.models.build import build_foundation

    model, _ = build_foundation(load_config(TINY_YAML, []).model)
    return model


def _batches(rank: int) -> list[dict]:
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(4, 200, (B, T), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _rank_job(spec, stage: int) -> dict:
    """One rank: the same seeded model, its own batches, ZeRO ``stage``; returns the full weights."""
    import os

    import torch

    from gaisnet_ray.cloudengine import CloudEngineConfig, CloudTrainer

    torch.set_num_threads(1)
    settings = CloudEngineConfig(engine="deepspeed", zero_stage=stage, workers=spec.size)
    with CloudTrainer(_model(), settings, lr=1e-3, weight_decay=0.0, micro_batch_size=B, world=spec) as trainer:
        import torch.distributed as dist

        size, rank = dist.get_world_size(), dist.get_rank()
        losses = [trainer.step(b) for b in _batches(spec.rank)]
        state = trainer.state_dict_for(None)  # a collective under ZeRO-3
    left = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k in os.environ]
    return {"size": size, "rank": rank, "losses": losses, "state": state, "env_left": left,
            "group_alive": dist.is_initialized(), "pid": os.getpid()}


@pytest.fixture(scope="module")
def rank_task(ray_local):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    return ray_local.remote(num_cpus=1)(_rank_job)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_world_stays_in_sync_and_equals_one_process_on_both_batches(ray_local, rank_task, stage):
    from gaisnet_ray.cloudengine import CloudEngineConfig, CloudTrainer
    from gaisnet_ray.cloudengine.world import WorldSpec

    port = free_port()
    refs = [rank_task.remote(WorldSpec(r, 2, "127.0.0.1", port), stage) for r in (0, 1)]
    r0, r1 = ray_local.get(refs, timeout=300)
    assert (r0["size"], r0["rank"], r1["rank"]) == (2, 0, 1)
    assert r0["losses"] != r1["losses"]  # each rank trained on its own batches
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), f"ranks disagree on {k}"
    # ended cleanly: the group is gone and the rendezvous variables set for it were removed
    assert not r0["group_alive"] and not r1["group_alive"] and r0["env_left"] == r1["env_left"] == []

    torch.manual_seed(0)
    with CloudTrainer(_model(), CloudEngineConfig(), lr=1e-3, weight_decay=0.0) as ref:
        for a, b in zip(_batches(0), _batches(1)):
            ref.step({k: torch.cat([a[k], b[k]]) for k in a})
        expected = ref.state_dict_for(None)
    initial = _model().state_dict()
    moved = 0
    for k, v in expected.items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=2e-6, msg=k)
        moved += not torch.equal(v, initial[k])
    assert moved > 10  # the steps did change the weights


def test_the_same_workers_form_a_new_world_after_closing_one(ray_local, rank_task):
    from gaisnet_ray.cloudengine.world import WorldSpec

    pids = set()
    for _ in range(2):
        port = free_port()
        out = ray_local.get([rank_task.remote(WorldSpec(r, 2, "127.0.0.1", port), 2) for r in (0, 1)], timeout=300)
        assert [o["rank"] for o in out] == [0, 1]
        pids |= {o["pid"] for o in out}
    assert len(pids) <= 4  # Ray reuses its workers; a reused process opened a second world


def test_cloud_node_with_two_workers_pretrains_and_distills(ray_local, tmp_path):
    from gaisnet_ray.config import load_config
    from gaisnet_ray.driver import GaisNetDriver

    cfg = load_config(TINY_YAML, [
        "topology.edges=1", "topology.devices_per_edge=1", "topology.cluster_size=1",
        "data.samples_per_device=16", "data.eval_samples_per_domain=2", "data.public_samples=32",
        "training.pretrain_steps=3", "training.pretrain_batch_size=4", "training.local_steps=1",
        "training.batch_size=4", "training.rounds=1", "cloud.engine=deepspeed", "cloud.zero_stage=2",
        "cloud.workers=2", "relay.policy=distill", "relay.distill_samples=8", "relay.distill_heldout=4",
        "relay.distill_steps=2", "relay.distill_batch_size=4", "relay.distill_seq_len=16", "run.progress=false",
    ])
    driver = GaisNetDriver(cfg, tmp_path)
    try:
        driver.start()
        assert ray_local.cluster_resources()["gaisnet_cloud"] - ray_local.available_resources().get(
            "gaisnet_cloud", 0) == 2  # the CloudNode and its CloudWorker
        metrics = driver.run_round(1)
        reports = ray_local.get(driver.cloud.peer_reports.remote(), timeout=60)
    finally:
        driver.close()
    assert [r["rank"] for rs in reports for r in rs] == [1, 1]  # pre-training and distillation ran on rank 1
    assert len(reports[0][0]["losses"]) == 3 and len(reports[1][0]["train_kl"]) == 2
    distilled = metrics["relay"]["distill"]  # (one local step: the KL itself is covered by test_relay.py)
    assert len(distilled["train_kl_last"]) == 1 and reports[1][0]["kl_after"] == pytest.approx(distilled["kl_after"])
    tag = (tmp_path / "cloud" / "checkpoints" / "latest").read_text().strip()
    ranks = sorted(p.name for p in (tmp_path / "cloud" / "checkpoints" / tag).glob("*optim_states.pt"))
    assert len(ranks) == 2, ranks  # ZeRO-2 partitioned the optimizer state over both ranks
    assert json.loads((tmp_path / "knowledge" / "bases" / "b0001" / "lineage.json").read_text())["policy"] == "distill"
