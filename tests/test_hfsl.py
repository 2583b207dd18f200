"""The whole GaisNet cycle in one process (``InProcessGaisNet``, no Ray): HFSL learns, its clusters,
knowledge versions and lineage reach the run folder and load with plain peft, bytes per link match
the hand count; HFSL, FL and SL give the same adapter keys, FL moves only adapters, SL members train
in turn. Byte and delay expectations are worked out by hand from the config in the comments.

Planning without a model: test_hfsl_plan.py; each node's core on its own: test_hfsl_nodes.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gaisnet_ray.config import load_config
from gaisnet_ray.inprocess import InProcessGaisNet
from gaisnet_ray.knowledge import KnowledgeStore

from conftest import ACT, DEVICE_ADAPTER, FULL_ADAPTER, HFSL_JOB, STEPS
from tinycfg import TINY_YAML

torch.set_num_threads(1)



# ---------------------------------------------------------------------------- the whole cycle
@pytest.fixture(scope="module")
def hfsl_run(tmp_path_factory):
    """3 HFSL rounds in one process; keeps the initial eval and every round's metrics."""
    cfg = load_config(TINY_YAML, HFSL_JOB)
    run_dir = tmp_path_factory.mktemp("hfsl")
    net = InProcessGaisNet(cfg, run_dir)
    initial = net.cloud.evaluate()
    metrics = [net.run_round(r) for r in (1, 2, 3)]
    return {"cfg": cfg, "net": net, "dir": run_dir, "initial": initial, "metrics": metrics}


def _mean_eval_loss(ev: dict) -> float:
    return sum(v["loss"] for v in ev.values()) / len(ev)


def test_hfsl_learns(hfsl_run):
    m = hfsl_run["metrics"]
    assert [x["round"] for x in m] == [1, 2, 3]
    assert [x["version"] for x in m] == [1, 2, 3]
    assert all(x["scheme"] == "hfsl" for x in m)
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    assert set(hfsl_run["initial"]) == set(m[-1]["eval"]) == {"arithmetic", "strings"}
    assert _mean_eval_loss(m[-1]["eval"]) < _mean_eval_loss(hfsl_run["initial"])
    for ev in m[-1]["eval"].values():
        assert 0.0 <= ev["exact_match"] <= 1.0


def test_hfsl_clusters_in_metrics(hfsl_run):
    # 2 devices per edge, cluster_size 2 -> one cluster per edge. Compute [1.0, 0.5] cycles over the
    # global index e * 2 + d, so on both edges device 0 has load 16 / 1.0 = 16 and device 1 has
    # 16 / 0.5 = 32: the lighter device 0 trains first.
    assert hfsl_run["metrics"][0]["clusters"] == {"edge-0": [["end-0-0", "end-0-1"]],
                                                  "edge-1": [["end-1-0", "end-1-1"]]}


def test_knowledge_versions_and_lineage(hfsl_run):
    net, run_dir = hfsl_run["net"], hfsl_run["dir"]
    store = KnowledgeStore(run_dir / "knowledge")
    assert store.versions() == [0, 1, 2, 3]
    sizes = {d: t.num_samples for d, t in net.devices.items()}
    assert sizes == {"end-0-0": 16, "end-0-1": 16, "end-1-0": 16, "end-1-1": 16}
    v0 = store.lineage(0)
    assert v0["parent_version"] is None and v0["round"] == 0
    for v in (1, 2, 3):
        lin = store.lineage(v)
        assert lin["version"] == v
        assert lin["round"] == v
        assert lin["parent_version"] == v - 1
        assert lin["scheme"] == "hfsl"
        assert lin["aggregation"] == "fedavg"
        assert lin["base"] == v0["base"] and lin["base"]["path"] == "model"
        assert lin["num_samples"] == sum(sizes.values()) == 64
        assert set(lin["edges"]) == {"edge-0", "edge-1"}
        for e, info in lin["edges"].items():
            assert info["num_samples"] == 32
            assert sorted(m for c in info["clusters"] for m in c) == sorted(net.by_edge[e])
            assert info["device_samples"] == {d: 16 for d in net.by_edge[e]}
    # The latest version is what the cloud holds, and every version has the same keys.
    latest = store.load(3)
    assert set(latest) == set(store.load(0)) and len(latest) == 32
    for k, v in net.cloud.knowledge.items():
        assert torch.equal(latest[k], v)
    assert [r["version"] for r in store.history()] == [0, 1, 2, 3]


def test_latest_version_loads_with_plain_peft(hfsl_run):
    run_dir, net = hfsl_run["dir"], hfsl_run["net"]
    plain = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    ids = torch.randint(4, 260, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = plain(input_ids=ids).logits
        model = PeftModel.from_pretrained(plain, KnowledgeStore(run_dir / "knowledge").path(3))
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, net.cloud.peft(input_ids=ids).logits)
    assert (logits - base_logits).abs().max() > 1e-4  # the knowledge changed the model


def test_hfsl_bytes_by_hand(hfsl_run):
    cfg, m = hfsl_run["cfg"], hfsl_run["metrics"][0]
    # One device turn: 4 steps x (h_k up + dL/dh_m up) + its adapter part up once.
    turn_up = STEPS * 2 * ACT + DEVICE_ADAPTER  # 4*2*98304 + 57344 = 843776
    # Down mirrors it: 4 steps x (h_m + dL/dh_k) + the adapter part it pulled.
    turn_down = STEPS * 2 * ACT + DEVICE_ADAPTER
    assert m["bytes"] == {
        "end_edge_up": 4 * turn_up,  # 3375104
        "end_edge_down": 4 * turn_down,
        "edge_cloud_up": 2 * FULL_ADAPTER,  # 229376
        "edge_cloud_down": 2 * FULL_ADAPTER,
    }
    assert m["bytes"]["end_edge_up"] == 3_375_104
    assert m["bytes_up"] == 4 * turn_up + 2 * FULL_ADAPTER
    assert m["bytes_down"] == 4 * turn_down + 2 * FULL_ADAPTER
    # Modeled delay: per turn, end-edge 20 Mbps / 20 ms: (up + down) bytes plus 9 + 9 messages
    # (2 per step each way + the adapter); 2 members in turn; edges in parallel; plus the
    # edge-cloud pull and push at 1000 Mbps / 10 ms.
    ee, ec = cfg.links.end_edge, cfg.links.edge_cloud
    turn_s = (turn_up + turn_down) * 8 / (ee.bandwidth_mbps * 1e6) + 18 * ee.latency_ms / 1e3  # 1.03502
    relay_s = FULL_ADAPTER * 8 / (ec.bandwidth_mbps * 1e6) + ec.latency_ms / 1e3
    assert m["modeled_comm_s"] == pytest.approx(2 * turn_s + 2 * relay_s)
    assert m["modeled_comm_s"] == pytest.approx(2.091875008)
    # Every round moves the same bytes.
    assert all(x["bytes"] == m["bytes"] for x in hfsl_run["metrics"])


@pytest.fixture(scope="module")
def one_round(tmp_path_factory):
    """One round per scheme on 1 edge x 3 devices (so SL and HFSL clusters differ)."""
    out = {}
    for scheme in ("hfsl", "fl", "sl"):
        cfg = load_config(TINY_YAML, [*HFSL_JOB, "topology.edges=1", "topology.devices_per_edge=3",
                                 f"training.scheme={scheme}"])
        net = InProcessGaisNet(cfg, tmp_path_factory.mktemp(scheme))
        out[scheme] = (net, net.run_round(1))
    return out


def test_schemes_produce_the_same_adapter_keys(one_round):
    keys = {s: set(net.knowledge) for s, (net, _) in one_round.items()}
    assert keys["hfsl"] == keys["fl"] == keys["sl"]
    assert len(keys["hfsl"]) == 32
    for s, (net, m) in one_round.items():
        assert m["version"] == 1 and m["scheme"] == s
        assert KnowledgeStore(net.cloud.store.root).versions() == [0, 1]
        for k, v in net.knowledge.items():
            assert torch.isfinite(v).all(), f"{s}: {k}"


def test_schemes_cluster_shapes(one_round):
    # 3 devices on edge-0, compute 1.0, 0.5, 1.0 -> loads 16, 32, 16.
    # hfsl size 2: 32 -> c0, 16 (end-0-0) -> c1, 16 (end-0-2) -> c1.
    assert one_round["hfsl"][1]["clusters"] == {"edge-0": [["end-0-1"], ["end-0-0", "end-0-2"]]}
    assert one_round["fl"][1]["clusters"] == {"edge-0": [["end-0-0"], ["end-0-1"], ["end-0-2"]]}
    assert one_round["sl"][1]["clusters"] == {"edge-0": [["end-0-0", "end-0-1", "end-0-2"]]}


def test_fl_moves_only_adapters(one_round):
    fl_net, fl = one_round["fl"]
    assert fl_net.edges["edge-0"].split is None  # the edge holds no model under FL
    assert all(d.cut is None for d in fl_net.devices.values())
    # Each FL device pulls and pushes the whole adapter once; no activations.
    assert fl["bytes"]["end_edge_up"] == 3 * FULL_ADAPTER == 344064
    assert fl["bytes"]["end_edge_down"] == 3 * FULL_ADAPTER
    # HFSL/SL devices push only their blocks' part (2 of 4 blocks): half the adapter bytes, but
    # activations and gradients dominate their traffic.
    for scheme in ("hfsl", "sl"):
        m = one_round[scheme][1]
        adapter_part = 3 * DEVICE_ADAPTER
        activations = 3 * STEPS * 2 * ACT
        assert m["bytes"]["end_edge_up"] == adapter_part + activations == 2_531_328
        assert 2 * adapter_part == fl["bytes"]["end_edge_up"]
        assert m["bytes"]["end_edge_up"] > fl["bytes"]["end_edge_up"]
    # Edge-cloud traffic is the same full adapter under every scheme.
    assert {one_round[s][1]["bytes"]["edge_cloud_up"] for s in one_round} == {FULL_ADAPTER}


def test_sl_members_train_in_turn(one_round):
    cfg = one_round["sl"][0].cfg
    ee, ec = cfg.links.end_edge, cfg.links.edge_cloud
    turn_s = 2 * (STEPS * 2 * ACT + DEVICE_ADAPTER) * 8 / (ee.bandwidth_mbps * 1e6) + 18 * ee.latency_ms / 1e3
    relay_s = FULL_ADAPTER * 8 / (ec.bandwidth_mbps * 1e6) + ec.latency_ms / 1e3
    # SL: 3 turns one after another; HFSL: the 2-member cluster is the slower of the two.
    assert one_round["sl"][1]["modeled_comm_s"] == pytest.approx(3 * turn_s + 2 * relay_s)
    assert one_round["hfsl"][1]["modeled_comm_s"] == pytest.approx(2 * turn_s + 2 * relay_s)


def test_run_folder_metrics_are_json(hfsl_run):
    # Round metrics must be JSON as they go to metrics.jsonl.
    for m in hfsl_run["metrics"]:
        assert json.loads(json.dumps(m)) == m
