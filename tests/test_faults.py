"""Faults with real actors and processes: a device killed mid-round, a device that hangs past the
turn timeout, an edge killed mid-round (its devices reassigned), and a driver killed mid-run that
`gaisnet run --resume` continues to the same knowledge as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tinycfg import TINY_YAML

pytestmark = pytest.mark.ray

FAULTY = [
    "topology.edges=2", "topology.devices_per_edge=2", "topology.cluster_size=2",
    "data.samples_per_device=32", "data.eval_samples_per_domain=2", "data.public_samples=32",
    "training.pretrain_steps=0", "training.local_steps=12", "training.batch_size=8", "training.rounds=2",
    "training.eval_every=10", "relay.policy=none", "run.progress=false",
]


def _driver(tmp_path, extra=()):
    from gaisnet_ray.config import load_config
    from gaisnet_ray.driver import GaisNetDriver

    cfg = load_config(TINY_YAML, [*FAULTY, *extra])
    driver = GaisNetDriver(cfg, tmp_path)
    driver.start()
    return cfg, driver


def _first_members(cfg, driver, edge: str) -> list[list[str]]:
    from gaisnet_ray.schemes.plan import plan_clusters

    counts = {d: driver.sample_counts[d] for d in driver.members[edge]}
    return list(plan_clusters(cfg, edge, counts).values())


def _round_in_thread(driver, round_idx: int) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["metrics"] = driver.run_round(round_idx)
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _joined(t: threading.Thread, box: dict) -> dict:
    t.join(timeout=300)
    assert not t.is_alive(), "the round did not finish"
    if "error" in box:
        raise box["error"]
    return box["metrics"]


def _lineage(run_dir: Path, version: int) -> dict:
    return json.loads((run_dir / "knowledge" / f"v{version:04d}" / "lineage.json").read_text())


def test_a_device_killed_mid_round_sits_out_and_the_weights_renormalize(ray_local, tmp_path):
    cfg, driver = _driver(tmp_path, ["topology.edges=1"])  # one edge's cluster of two is all it needs
    try:
        victim = _first_members(cfg, driver, "edge-0")[0][0]  # its turn starts first
        total = sum(driver.sample_counts.values())
        t, box = _round_in_thread(driver, 1)
        time.sleep(1.0)
        ray_local.kill(driver.devices[victim])
        rounds = [_joined(t, box), driver.run_round(2)]
    finally:
        driver.close()
    # the kill lands in round 1's turn (or, on a slow machine, just after it): either way one round
    # finds the device dead, completes with the others, and leaves its samples out of the weights
    hit = [m for m in rounds if victim in m["faults"]["dropped"]]
    assert len(hit) == 1 and hit[0]["faults"]["dropped"][victim].startswith("died"), [m["faults"] for m in rounds]
    lineage = _lineage(tmp_path, hit[0]["version"])
    assert lineage["num_samples"] == total - driver.sample_counts[victim]
    assert victim not in lineage["edges"]["edge-0"]["device_samples"]
    assert rounds[-1]["faults"]["dead_devices"] == [victim]
    assert _lineage(tmp_path, 2)["num_samples"] == total - driver.sample_counts[victim]  # out for good


def test_a_device_past_the_turn_timeout_is_dropped_and_its_cluster_goes_on(ray_local, tmp_path):
    cfg, driver = _driver(tmp_path, ["topology.edges=1", "faults.turn_timeout_s=4", "training.local_steps=4"])
    pid = None
    try:
        first, second = _first_members(cfg, driver, "edge-0")[0]
        pid = ray_local.get(driver.devices[second].__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGSTOP)  # the device hangs: it neither answers nor dies
        metrics = driver.run_round(1)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        driver.close()
    assert metrics["faults"]["dropped"] == {second: "timed out after 4s"}
    edge = _lineage(tmp_path, 1)["edges"]["edge-0"]
    assert edge["clusters"] == [[first]] and set(edge["device_samples"]) == {first}
    assert metrics["faults"]["dead_devices"] == []  # slow is not dead: it may take part next round


def test_an_edge_killed_mid_round_loses_its_round_and_its_devices_move(ray_local, tmp_path):
    cfg, driver = _driver(tmp_path, ["topology.end_workers=2"])  # the devices on a pool: only edges are killed
    try:
        t, box = _round_in_thread(driver, 1)
        time.sleep(1.0)
        ray_local.kill(driver.edges["edge-1"])
        rounds = [_joined(t, box)]
        while not rounds[-1]["faults"]["lost_edges"] and len(rounds) < 2:  # a fast machine: round 2 finds it
            rounds.append(driver.run_round(len(rounds) + 1))
        rounds.append(driver.run_round(len(rounds) + 1))
    finally:
        driver.close()
    lost, after = rounds[-2], rounds[-1]
    assert lost["faults"]["lost_edges"] == ["edge-1"]
    assert set(lost["faults"]["reassigned"]) == {"end-1-0", "end-1-1"}
    assert set(lost["faults"]["reassigned"].values()) == {"edge-0"}
    assert set(_lineage(tmp_path, lost["version"])["edges"]) == {"edge-0"}
    # the next round: edge-0 trains its own devices and the moved ones
    edges = _lineage(tmp_path, after["version"])["edges"]
    assert set(edges) == {"edge-0"}
    assert set(edges["edge-0"]["device_samples"]) == {"end-0-0", "end-0-1", "end-1-0", "end-1-1"}
    assert after["faults"]["dropped"] == {}


def test_resume_after_the_driver_is_killed_ends_with_the_uninterrupted_knowledge(tmp_path):
    from gaisnet_ray.config import load_config
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.knowledge import KnowledgeStore

    # 2 rounds, killed after the first; the devices on a pool of 2 workers (the default's shape on small hosts,
    # and 2 processes fewer to start twice than one actor per device)
    run_dir, rounds = tmp_path / "run", 2
    sets = [a for kv in [*FAULTY, f"training.rounds={rounds}", "training.local_steps=3", "relay.policy=merge",
                         "topology.end_workers=2"]
            for a in ("--set", kv)]
    proc = subprocess.Popen([sys.executable, "-m", "gaisnet_ray", "run", str(TINY_YAML), "--out", str(run_dir), "--no-progress",
                             *sets], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "round 1 never finished"
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no cleanup at all, as a crashed or preempted driver
    proc.wait(timeout=60)
    done = metrics.read_text().count("\n")
    assert done < rounds

    resumed = subprocess.run([sys.executable, "-m", "gaisnet_ray", "run", "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["resumed_after_round"] == done and summary["eval_initial"]

    torch.set_num_threads(1)
    cfg = load_config(run_dir / "config.yaml")
    reference = InProcessGaisNet(cfg, tmp_path / "uninterrupted")
    for r in range(1, rounds + 1):
        reference.run_round(r)
    got, want = KnowledgeStore(run_dir / "knowledge"), KnowledgeStore(tmp_path / "uninterrupted" / "knowledge")
    assert got.versions() == want.versions() == [0, 1, 2]
    for v in (1, 2):
        a, b = got.load(v), want.load(v)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"v{v} {k}")
    from safetensors.torch import load_file

    model, ref_model = load_file(run_dir / "model" / "model.safetensors"), \
        load_file(tmp_path / "uninterrupted" / "model" / "model.safetensors")
    for k in ref_model:
        torch.testing.assert_close(model[k], ref_model[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_hung_device_on_a_pool_worker_costs_its_neighbours_one_timeout_and_a_restart(ray_local, tmp_path):
    # two logical devices on one EndWorker, each its own cluster: the first to start hangs (its
    # train_turn never returns); the worker is restarted after one timeout and the other device trains
    cfg, driver = _driver(tmp_path, ["topology.edges=1", "topology.cluster_size=1", "topology.end_workers=1",
                                     "faults.turn_timeout_s=6", "training.local_steps=2", "faults.min_edge_updates=1"])
    try:
        hung, other = (c[0] for c in _first_members(cfg, driver, "edge-0"))
        worker = driver.devices[hung]

        def hang(self, device=hung):
            def forever(*args, **kwargs):
                time.sleep(3600)

            self.cores[device].train_turn = forever

        ray_local.get(worker.__ray_call__.remote(hang), timeout=60)
        started = time.monotonic()
        first = driver.run_round(1)
        took = time.monotonic() - started
        assert driver.devices[other] is not worker  # a fresh worker
        second = driver.run_round(2)
    finally:
        driver.close()
    assert first["faults"]["dropped"] == {hung: "timed out after 6s"} and first["faults"]["dead_devices"] == []
    assert _lineage(tmp_path, 1)["edges"]["edge-0"]["clusters"] == [[other]]
    assert took < 6 + 60, took  # one timeout, a restart, one turn: never a second timeout
    assert second["faults"]["dropped"] == {}  # the restarted worker trains both
    assert set(_lineage(tmp_path, 2)["edges"]["edge-0"]["device_samples"]) == {hung, other}
