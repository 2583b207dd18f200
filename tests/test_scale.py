"""Logical devices on a bounded pool of EndWorker actors, with sampled participants per round:
the same knowledge as one trainer per device, and many devices on few actors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gaisnet_ray.config import load_config

from tinycfg import TINY_YAML

POOL = [
    "topology.edges=2", "topology.devices_per_edge=3", "topology.cluster_size=2", "topology.end_workers=2",
    "training.participants_per_edge=2", "data.samples_per_device=24", "data.eval_samples_per_domain=2",
    "data.public_samples=32", "training.pretrain_steps=0", "training.local_steps=2", "training.batch_size=8",
    "training.rounds=3", "training.eval_every=10", "run.progress=false",
]


def _lineage(run_dir: Path, version: int) -> dict:
    return json.loads((run_dir / "knowledge" / f"v{version:04d}" / "lineage.json").read_text())


def test_participants_are_a_seeded_sample_per_edge_and_round():
    from gaisnet_ray.schemes.plan import participants

    cfg = load_config(TINY_YAML, POOL)
    devices = ["end-0-0", "end-0-1", "end-0-2"]
    picks = [participants(cfg, "edge-0", devices, r) for r in range(1, 7)]
    assert all(len(p) == 2 and set(p) <= set(devices) for p in picks)
    assert picks == [participants(cfg, "edge-0", devices, r) for r in range(1, 7)]  # stable
    assert len({tuple(p) for p in picks}) > 1  # and it varies over rounds
    assert participants(cfg, "edge-0", devices, None) == devices
    everyone = load_config(TINY_YAML, [*POOL, "training.participants_per_edge=null"])
    assert participants(everyone, "edge-0", devices, 3) == devices


@pytest.mark.ray
def test_a_pool_of_two_workers_trains_like_one_trainer_per_device(ray_local, tmp_path):
    from gaisnet_ray.driver import GaisNetDriver
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.schemes.plan import participants
    from gaisnet_ray.knowledge import KnowledgeStore

    cfg = load_config(TINY_YAML, POOL)
    driver = GaisNetDriver(cfg, tmp_path / "pool")
    driver.start()
    try:
        end_used = ray_local.cluster_resources()["gaisnet_end"] - ray_local.available_resources().get("gaisnet_end", 0)
        assert end_used == 2 and len(set(map(id, driver.devices.values()))) == 2  # 6 devices, 2 actors
        for r in (1, 2, 3):
            driver.run_round(r)
    finally:
        driver.close()
    for r in (1, 2, 3):
        edges = _lineage(tmp_path / "pool", r)["edges"]
        for e, info in edges.items():
            devices = [f"end-{e[-1]}-{i}" for i in range(3)]
            assert sorted(info["device_samples"]) == sorted(participants(cfg, e, devices, r))

    torch.set_num_threads(1)
    reference = InProcessGaisNet(cfg, tmp_path / "inproc")  # one DeviceTrainer (and model) per device
    for r in (1, 2, 3):
        reference.run_round(r)
    got, want = KnowledgeStore(tmp_path / "pool" / "knowledge"), KnowledgeStore(tmp_path / "inproc" / "knowledge")
    for v in (1, 2, 3):
        a, b = got.load(v), want.load(v)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"v{v} {k}")


@pytest.mark.ray
def test_two_hundred_logical_devices_on_two_workers(ray_local, tmp_path):
    from gaisnet_ray.driver import GaisNetDriver

    cfg = load_config(TINY_YAML, [
        "topology.edges=2", "topology.devices_per_edge=100", "topology.end_workers=2", "topology.cluster_size=2",
        "training.participants_per_edge=3", "data.partition=iid", "data.samples_per_device=8",
        "data.eval_samples_per_domain=2", "data.public_samples=32", "training.pretrain_steps=0",
        "training.local_steps=1", "training.batch_size=4", "training.rounds=1", "relay.policy=none",
        "run.progress=false",
    ])
    driver = GaisNetDriver(cfg, tmp_path)
    driver.start()
    try:
        assert len(driver.sample_counts) == 200 and len(driver.end_actors) == 2
        metrics = driver.run_round(1)
    finally:
        driver.close()
    lineage = _lineage(tmp_path, 1)
    assert sum(len(e["device_samples"]) for e in lineage["edges"].values()) == 6
    assert lineage["num_samples"] == 6 * 8 and metrics["faults"]["dropped"] == {}
