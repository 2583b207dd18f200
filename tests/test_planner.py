"""The planner: the cost model against hand-computed FLOPs and bytes, the bandwidth shares against
a closed form, the exact search against brute force, memory budgets, never worse than the fixed
plan, the heuristic on a large fleet, `gaisnet plan`. Ray-free, torch-free except where noted."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from gaisnet_ray.config import ConfigError
from gaisnet_ray.schemes.plan import plan_clusters
from gaisnet_ray.planner.cost import RoundShape, turn_seconds, turn_terms
from gaisnet_ray.planner.planning import (
    PlanError,
    alternatives,
    apply_plan,
    fixed_plan,
    optimized_plan,
    plan_round,
)
from gaisnet_ray.planner.profiles import DeviceProfile, EdgeProfile, Fleet, build_fleet
from gaisnet_ray.planner.search import SearchSpace, evaluate_edge, set_partitions, bell
from gaisnet_ray.planner.shares import MemberTerms, optimal_shares
from tinycfg import TINY_YAML, tiny_config

# The tiny GPT-2 preset's geometry, written out: 4 blocks, hidden 64, MLP 192, 4 heads, vocab 260.
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_inner": 192, "vocab_size": 260,
             "n_positions": 64, "tie_word_embeddings": True}


def _cfg(*overrides: str):
    return tiny_config("planner.host_gflops=10", *overrides)


def _shape(cfg=None, layers: int = 4) -> RoundShape:
    return RoundShape.from_config(cfg or _cfg(), {**TINY_GPT2, "n_layer": layers})


# ------------------------------------------------------------------------------- cost model
def test_flops_and_bytes_of_a_cut_match_hand_computed_values():
    shape = _shape()  # batch 16 x 48 tokens, 6 steps, LoRA r=8 on c_attn, c_proj, c_fc
    # block params: 4 h^2 + 2 h i + 9 h + i = 16384 + 24576 + 576 + 192
    assert shape.geometry.block_params() == 41_728
    # LoRA r=8: c_attn 8(64+192) + c_proj 8(64+64) + mlp c_proj 8(192+64) + c_fc 8(64+192)
    assert shape.lora_block_params == 2048 + 1024 + 2048 + 2048
    # per token: 2 x 41728 (projections) + 4 x 48 x 64 (scores, weighted sum) + 2 x 7168 (LoRA) = 110080
    assert shape.block_forward_flops() == 110_080 * 768
    assert shape.block_train_flops() == 2 * 110_080 * 768
    # head: 2 x 64 x 260 per supervised position (half of 768), forward + backward
    assert shape.head_train_flops() == 2 * 2 * 64 * 260 * 384
    assert shape.device_flops(2) == 2 * 169_082_880 + 25_559_040  # cut 1+1: 2 blocks + head
    assert shape.edge_flops(2) == 2 * 169_082_880  # the middle 2 blocks
    assert shape.hidden_bytes() == 16 * 48 * 64 * 4
    assert shape.adapter_bytes(2) == 2 * 7168 * 4
    up, down = shape.turn_bytes(2)
    assert up == down == 6 * 2 * 196_608 + 57_344
    # privacy.send_gradients false: one message each way a step, the middle forward only
    forward_only = _shape(_cfg("privacy.send_gradients=false"))
    assert forward_only.turn_bytes(2) == (6 * 196_608 + 57_344,) * 2
    assert forward_only.edge_flops(2) == 2 * 110_080 * 768 and forward_only.device_flops(2) == shape.device_flops(2)


def test_device_memory_is_the_memory_estimate_of_an_end_actor():
    from gaisnet_ray.hfsl.memory import estimate_job

    for cut in ("{front_layers: 1, back_layers: 1}", "{front_layers: 1, back_layers: 2}"):
        cfg = _cfg(f"topology.cut={cut}")
        mc = TINY_GPT2
        shape = RoundShape.from_config(cfg, mc)
        d = cfg.topology.cut.front_layers + cfg.topology.cut.back_layers
        assert shape.device_memory(d) == estimate_job(cfg, mc).by_kind()["end"].peak_bytes


def _device(i: str, gflops: float, up_mbps: float = 100, memory: float | None = None, edge: str = "edge-0",
            latency_s: float = 0.01) -> DeviceProfile:
    return DeviceProfile(i, edge, "test", gflops * 1e9, memory, up_mbps * 1e6, 2 * up_mbps * 1e6, latency_s,
                         0.3e-9, 0.5e-6, 0.2e-6)


def _edge(e: str = "edge-0", gflops: float = 50, mbps: float = 100) -> EdgeProfile:
    return EdgeProfile(e, gflops * 1e9, mbps * 1e6, 1e9, 0.01)


def test_a_turn_adds_compute_transfers_and_latency_by_hand():
    shape = _shape()
    dev, edge = _device("d", gflops=1, up_mbps=10, latency_s=0.02), _edge(gflops=4, mbps=40)
    t = turn_terms(shape, dev, edge, 2, clusters=2)
    compute = 6 * (363_724_800 / 1e9 + 338_165_760 * 2 / 4e9 + 4 * 0.02) + 2 * 0.02
    assert t.compute_s == pytest.approx(compute)
    bits = 8 * 2_416_640
    # share 0.5 of 40 Mbit/s = 20: the device's own 10 up binds, 20 down (its link: 20)
    assert turn_seconds(t, dev, edge, 0.5) == pytest.approx(compute + bits / 10e6 + bits / 20e6)
    assert t.energy_j == pytest.approx(0.3e-9 * 6 * 363_724_800 + 0.5e-6 * 2_416_640 + 0.2e-6 * 2_416_640)


def test_optimal_shares_match_the_closed_form():
    # cluster 1: 1 s + W bits, cluster 2: 1 s + 3W bits, uncapped: 1 + 1/s = 1 + 3/(1 - s) -> s = 1/4, T = 5
    w = 1e6
    terms = MemberTerms([[1.0], [1.0]], [[w], [3 * w]], [[0.0], [0.0]], [1e18, 1e18], [1e18, 1e18], [0, 1], 2, w)
    t, s = optimal_shares(terms)
    assert t == pytest.approx(5.0, rel=1e-6)
    assert s == pytest.approx([0.25, 0.75], rel=1e-5)
    assert terms.cluster_times(np.array([0.5, 0.5])).max() == pytest.approx(7.0)  # equal shares: 1 + 3 / 0.5


def test_set_partitions_counts_are_bell_numbers():
    for n in range(1, 7):
        assert sum(1 for _ in set_partitions(list(range(n)))) == bell(n)
    assert sorted(len(p) for p in set_partitions(list(range(4)), block_size=2)) == [2, 2, 2]


# ----------------------------------------------------------------------------- exact search
def _fleet(devices: list[DeviceProfile], edges: list[EdgeProfile]) -> Fleet:
    return Fleet(tuple(devices), tuple(edges), 100e9, 10e9)


def _small_fleet(seed: int, n: int = 4, memory: bool = True) -> Fleet:
    rng = np.random.default_rng(seed)
    shape = _shape(layers=6)
    devs = []
    for i in range(n):
        mem = float(shape.device_memory(int(rng.integers(2, 6)))) if memory else None
        devs.append(_device(f"end-0-{i}", float(rng.uniform(0.5, 40)), float(rng.uniform(5, 80)), mem,
                            latency_s=float(rng.uniform(0, 0.03))))
    return _fleet(devs, [_edge(gflops=float(rng.uniform(5, 60)), mbps=float(rng.uniform(20, 100)))])


def _brute_force(space: SearchSpace, fleet: Fleet) -> float:
    """Every cut of every device (2 .. L-1 blocks within its memory), every clustering, optimal
    shares: the least delay + w x energy."""
    shape, edge = space.shape, fleet.edges[0]
    devs = list(fleet.devices)
    cuts = [range(2, shape.max_blocks_within(d.memory_bytes) + 1) for d in devs]
    best = math.inf
    from gaisnet_ray.planner.cost import cloud_overhead_s

    cloud = cloud_overhead_s(shape, fleet, 1)
    for parts in set_partitions(devs):
        for choice in itertools.product(*cuts):
            opts = {d.device_id: [b] for d, b in zip(devs, choice)}
            p = evaluate_edge(space, edge, parts, opts)
            best = min(best, p.delay_s + cloud + space.energy_weight * p.energy_j)
    return best


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("energy_weight", [0.0, 0.05])
def test_exact_search_is_optimal_against_brute_force(seed, energy_weight):
    cfg = _cfg("topology.edges=1", "topology.devices_per_edge=3", f"planner.energy_weight={energy_weight}")
    shape, fleet = _shape(cfg, layers=6), _small_fleet(seed, n=3)
    space = SearchSpace(shape, fleet, energy_weight, 10_000)
    plan = optimized_plan(cfg, shape, fleet, force="exact")
    assert plan.methods == {"edge-0": "exact"}
    assert plan.objective == pytest.approx(_brute_force(space, fleet), rel=1e-6)
    heuristic = optimized_plan(cfg, shape, fleet, force="heuristic")
    assert heuristic.objective >= plan.objective * (1 - 1e-9)  # the exact one is a lower bound


def test_memory_budgets_are_respected_and_devices_that_fit_no_cut_are_excluded():
    cfg = _cfg("topology.edges=1", "topology.devices_per_edge=4")
    shape = _shape(cfg, layers=6)
    small = shape.device_memory(2) - 1  # cannot hold the smallest cut
    devs = [_device("end-0-0", 40, memory=float(shape.device_memory(3))), _device("end-0-1", 80, memory=None),
            _device("end-0-2", 2, memory=small), _device("end-0-3", 30, memory=float(shape.device_memory(2)))]
    fleet = _fleet(devs, [_edge(gflops=2)])  # a slow edge: devices want the largest cut they can hold
    for which in ("balanced", "optimized"):
        plan = plan_round(cfg, shape, fleet, planner=which)
        assert "end-0-2" in plan.excluded and "cannot hold" in plan.excluded["end-0-2"]
        assert all(d != "end-0-2" for cs in plan.clusters.values() for c in cs for d in c)
        for d, (f, b) in plan.cuts.items():
            m = fleet.device(d).memory_bytes
            assert m is None or shape.device_memory(f + b) <= m
            assert plan.memory_bytes[d] == shape.device_memory(f + b)
    plan = plan_round(cfg, shape, fleet, planner="optimized")
    assert sum(plan.cuts["end-0-0"]) == 3 and sum(plan.cuts["end-0-1"]) == 5 and sum(plan.cuts["end-0-3"]) == 2
    only_small = _fleet([_device(f"end-0-{i}", 1, memory=small) for i in range(4)], [_edge()])
    with pytest.raises(PlanError, match="no device can train"):
        plan_round(cfg, shape, only_small, planner="optimized")


@pytest.mark.parametrize("seed", range(3))
def test_optimized_is_never_worse_than_fixed(seed):
    cfg = _cfg("planner.fleet=classes", f"planner.seed={seed}", "topology.edges=3", "topology.devices_per_edge=4",
               "planner.host_gflops=20")
    shape = _shape(cfg)
    fleet = build_fleet(cfg, 20.0)
    fixed, opt = fixed_plan(cfg, shape, fleet), plan_round(cfg, shape, fleet, planner="optimized")
    assert opt.objective <= fixed.objective * (1 + 1e-9)
    assert plan_round(cfg, shape, fleet, planner="fixed").delay_s == pytest.approx(fixed.delay_s)


def test_heuristic_plans_a_large_fleet_validly():
    cfg = _cfg("planner.fleet=classes", "topology.edges=4", "topology.devices_per_edge=50")
    shape = _shape(cfg)
    fleet = build_fleet(cfg, 10.0)
    plan = optimized_plan(cfg, shape, fleet)
    assert set(plan.methods.values()) == {"heuristic"}
    placed = [d for cs in plan.clusters.values() for c in cs for d in c]
    assert sorted(placed) == sorted(d.device_id for d in fleet.devices if d.device_id not in plan.excluded)
    for e, shares in plan.shares.items():
        assert sum(shares) == pytest.approx(1.0) and len(shares) == len(plan.clusters[e])
    assert plan.delay_s <= fixed_plan(cfg, shape, fleet).delay_s


def test_fleet_generation_is_seeded_and_overridable():
    cfg = _cfg("planner.fleet=classes", "planner.devices={end-0-1: {gflops: 3, memory_gb: 2}}")
    a, b = build_fleet(cfg, 10.0), build_fleet(cfg, 10.0)
    assert a == b
    assert {d.kind for d in a.devices} <= {"phone", "laptop", "gateway", "explicit"}
    one = a.device("end-0-1")
    assert (one.kind, one.flops, one.memory_bytes) == ("explicit", 3e9, 2e9)
    host = build_fleet(_cfg(), 10.0)  # host fleet: host speed x topology.device_compute ([1.0, 0.5] cycled)
    assert [d.flops for d in host.devices][:2] == [10e9, 5e9]
    with pytest.raises(ConfigError, match="planner.devices"):
        build_fleet(_cfg("planner.devices={end-9-9: {gflops: 1}}"), 10.0)


def test_the_plan_reaches_the_runtime_cuts_and_clusters():
    cfg = _cfg("planner.fleet=classes", "topology.planner=optimized")
    shape = _shape(cfg)
    plan = plan_round(cfg, shape, build_fleet(cfg, 10.0))
    run_cfg = apply_plan(cfg, plan)
    for d, (f, b) in plan.cuts.items():
        c = run_cfg.topology.cut_for(d)
        assert (c.front_layers, c.back_layers) == (f, b)
    planned = plan.clusters["edge-0"]
    counts = {d: 10 for c in planned for d in c}
    assert list(plan_clusters(run_cfg, "edge-0", counts, planned).values()) == planned
    first = planned[0][0]
    del counts[first]  # a device that sits the round out: the rest keep their clusters
    got = list(plan_clusters(run_cfg, "edge-0", counts, planned).values())
    assert got == [g for g in ([d for d in c if d != first] for c in planned) if g]


def test_alternatives_cover_fixed_sequential_balanced_and_each_cluster_size():
    cfg = _cfg("planner.fleet=classes")
    names = [p.name for p in alternatives(cfg, _shape(cfg), build_fleet(cfg, 10.0))]
    assert names == ["fixed", "sequential", "balanced", "optimized", "cluster_size=1", "cluster_size=2",
                     "cluster_size=3"]
    with pytest.raises(PlanError, match="fl"):
        plan_round(_cfg("training.scheme=fl"), _shape(), build_fleet(_cfg(), 10.0))


def test_gaisnet_plan_prints_and_writes_json_and_exits_2_on_bad_input(tmp_path):
    out = tmp_path / "plan.json"
    run = [sys.executable, "-m", "gaisnet_ray", "plan", str(TINY_YAML), "--set", "planner.host_gflops=10",
           "--set", "planner.fleet=classes", "--set", "topology.planner=optimized", "--out", str(out)]
    p = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "<- chosen" in p.stdout and "cluster_size=1" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["chosen"]["name"] == "optimized" and len(doc["alternatives"]) == 7
    for bad, key in ((["--set", "topology.planner=best"], "topology.planner"),
                     (["--set", "training.scheme=fl"], "training.scheme")):
        p = subprocess.run(run[:5] + bad, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and key in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_resumed_run_plans_with_the_host_speed_its_first_start_recorded(tmp_path):
    from gaisnet_ray.planner.runtime import prepare_run, recorded_host_gflops

    cfg = tiny_config("planner.fleet=classes", "topology.planner=optimized")
    model = {**TINY_GPT2}
    assert recorded_host_gflops(tmp_path) is None
    first_cfg, first = prepare_run(cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"host_gflops": 7.5})}),
                                   model, run_dir=tmp_path)
    first.record(tmp_path)
    assert recorded_host_gflops(tmp_path) == 7.5
    # the resumed start has no planner.host_gflops: it must not recalibrate (a busier host would plan otherwise)
    again_cfg, again = prepare_run(cfg, model, run_dir=tmp_path)
    assert again.host_gflops == 7.5 and "recorded" in again.how
    same = lambda plan: {k: v for k, v in plan.to_dict().items() if k != "planning_s"}  # noqa: E731
    assert same(again.plan) == same(first.plan)
    assert again_cfg.topology.device_cuts == first_cfg.topology.device_cuts
