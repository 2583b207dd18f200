"""Heterogeneous devices on one machine: a slow device's turn takes its profile's time (its own
compute the cost model's FLOPs at its speed, its transfers delayed by its link model). In-process,
real tiny model and edge; and the run plan the runtime follows (cuts, clusters, emulation)."""

from __future__ import annotations

import time

import pytest
import torch

from gaisnet_ray.inprocess import DirectEdgeLink, InProcessGaisNet
from gaisnet_ray.planner.emulation import DeviceEmulation, _TimedLink
from tinycfg import tiny_config

torch.set_num_threads(1)
HOST = 8.0  # GFLOP/s this test says the host has (no calibration)


def _net(tmp_path, *extra: str) -> InProcessGaisNet:
    cfg = tiny_config("training.pretrain_steps=0", "training.local_steps=3", f"planner.host_gflops={HOST}",
                      "planner.emulate=true", "topology.planner=optimized", "topology.edges=1",
                      "topology.devices_per_edge=2",
                      f"planner.devices={{end-0-0: {{gflops: {HOST / 4}, uplink_mbps: 4, downlink_mbps: 8, "
                      f"latency_ms: 10}}, end-0-1: {{gflops: {HOST}}}}}", "planner.edge_bandwidth_mbps=1000", *extra)
    return InProcessGaisNet(cfg, tmp_path)


def test_a_slow_devices_turn_takes_its_profiles_time(tmp_path):
    net = _net(tmp_path)
    plan = net.run_plan
    d, e = "end-0-0", "edge-0"
    clusters = {f"{e}/c0": [d]}
    emu = plan.emulation(e, clusters, f"{e}/c0", d)
    blocks = sum(plan.plan.cuts[d])
    # its turn's compute at its speed: 3 steps of the cost model's FLOPs at 2 GFLOP/s (the host: 8)
    assert emu.compute_s == pytest.approx(3 * plan.shape.device_flops(blocks) / 2e9)
    assert emu.slowdown == pytest.approx(4.0)
    assert (emu.up_bps, emu.down_bps, emu.latency_s) == (4e6, 8e6, 0.01)  # its own link binds (edge: 1000)
    edge, device = net.edges[e], net.devices[d]
    edge.begin_round(net.knowledge, clusters)

    def turn(emulation=None):
        adapter = edge.begin_turn(f"{e}/c0", d, None)
        link = _TimedLink(DirectEdgeLink(edge, f"{e}/c0", d))
        started = time.perf_counter()
        result = device.train_turn(adapter, link, f"{e}/c0", 3, 1, emulation)
        return result, time.perf_counter() - started, link.waited_s

    turn()  # warm-up
    plain, wall0, waited0 = turn()
    result, wall1, _ = turn(emu)
    transfer = emu.transfer_s(result.link)
    # 3 steps: 4 messages each of 16 x 48 x 64 fp32, and the adapter both ways, at 4 / 8 Mbit/s + 10 ms each
    assert transfer == pytest.approx(8 * result.link.bytes_up / 4e6 + 8 * result.link.bytes_down / 8e6 + 14 * 0.01)
    assert emu.compute_s > 2 * (wall0 - waited0)  # the device is slower than the host: its profile's time binds
    expected = emu.compute_s + waited0 + transfer
    assert 0.8 * expected < wall1 < 1.5 * expected, (wall1, expected, wall0, waited0, transfer)
    assert result.compute_s == pytest.approx(wall1, rel=0.1)  # the turn reports the emulated time
    assert plain.losses and result.losses


def test_emulation_of_a_device_faster_than_the_host_is_not_faster(tmp_path):
    emu = DeviceEmulation(compute_s=0.0, up_bps=1e18, down_bps=1e18, latency_s=0.0)

    class Done:
        link = type("Usage", (), {"bytes_up": 0, "bytes_down": 0, "messages_up": 0, "messages_down": 0})()
        compute_s = 0.0

    started = time.perf_counter()
    assert emu.run_turn(lambda link: Done(), None).compute_s == 0.0
    assert time.perf_counter() - started < 0.5


def test_the_runtime_follows_the_plan_and_reports_modeled_and_measured(tmp_path):
    net = _net(tmp_path, "training.local_steps=1", "training.eval_every=5", "training.rounds=1")
    plan = net.run_plan.plan
    for d, (f, b) in plan.cuts.items():
        assert (net.devices[d].cut.front_end, net.devices[d].cut.back_start) == (f, 4 - b)
    m = net.run_round(1)
    got = [c for cs in m["clusters"].values() for c in cs]
    assert got == [c for cs in plan.clusters.values() for c in cs]
    assert m["plan"]["emulated"] is True and m["plan"]["planner"] == "optimized"
    assert m["plan"]["modeled_round_s"] > 0 and m["plan"]["measured_train_s"] > 0
