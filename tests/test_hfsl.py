"""Tests for gaisnet_ray.hfsl without Ray: clustering, the link model, round planning, the whole
cycle in one process (HFSL, FL, SL), byte accounting, robustness of the cloud, the message audit.

Byte and delay expectations are worked out by hand from the config in the comments.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gaisnet_ray.config import ConfigError, LinkConfig, load_config
from gaisnet_ray.data import Example, encode_examples
from gaisnet_ray.hfsl.audit import MessageAudit
from gaisnet_ray.hfsl.cloud import CloudCore
from gaisnet_ray.hfsl.clustering import DeviceProfile, cluster_devices
from gaisnet_ray.hfsl.evaluate import domain_loss, evaluate_domains
from gaisnet_ray.hfsl.inprocess import DirectEdgeLink, InProcessGaisNet, device_seed, device_trainer, edge_trainer
from gaisnet_ray.hfsl.linkmodel import clusters_comm_s, transfer_s, turn_comm_s
from gaisnet_ray.hfsl.messages import EdgeUpdate, LinkUsage
from gaisnet_ray.hfsl.plan import device_compute, devices_by_edge, plan_clusters
from gaisnet_ray.cloudengine import CloudTrainer
from gaisnet_ray.knowledge import KeyMismatchError, KnowledgeStore, NonFiniteUpdateError
from gaisnet_ray.models.adapters import adapter_state
from gaisnet_ray.models.build import FoundationPackage, build_foundation
from gaisnet_ray.models.split import build_tier_model, layer_of_key

from gaisnet_ray.models.parts import ModelPart
from tinycfg import TINY_YAML

torch.set_num_threads(1)

# Tiny run: 2 edges x 2 devices, 16 private samples each, batch 8 (so B = 8), 4 local steps,
# T = max_seq_len = 48, H = 64 (gpt2 tiny), LoRA r = 8 on 4 blocks, cut front 1 / back 1.
TINY = [
    "training.pretrain_steps=0", "topology.edges=2", "topology.devices_per_edge=2",
    "data.samples_per_device=16", "data.partition=iid", "data.eval_samples_per_domain=4",
    "data.domains=[arithmetic, strings]", "data.public_domains=[arithmetic]", "training.batch_size=8",
    "training.local_steps=4", "training.rounds=3", "training.lr=0.003",
    "relay.policy=none",  # the HFSL mechanics on one fixed base; tests/test_relay.py covers the relay
]
B, T, H, STEPS = 8, 48, 64, 4
ACT = B * T * H * 4  # one float32 (B, T, H) activation or gradient: 98304 bytes
# LoRA params per gpt2 block with r=8, H=64, MLP 192 (A is (8, in), B is (out, 8)):
#   c_attn 8*64 + 192*8 = 2048; attn.c_proj 8*64 + 64*8 = 1024; c_fc 8*64 + 192*8 = 2048;
#   mlp.c_proj 8*192 + 64*8 = 2048  ->  7168 params = 28672 bytes.
BLOCK_ADAPTER = 7168 * 4
FULL_ADAPTER = 4 * BLOCK_ADAPTER  # 114688 bytes: what an edge relays, what an FL device trains
DEVICE_ADAPTER = 2 * BLOCK_ADAPTER  # 57344 bytes: blocks 0 and 3 under the default cut


# ----------------------------------------------------------------------------------- clustering
def _profiles(*loads: tuple[str, int, float]) -> list[DeviceProfile]:
    return [DeviceProfile(d, n, c) for d, n, c in loads]


def test_balanced_clustering_hand_worked():
    # Loads 4, 3, 2, 1 into 2 clusters of 2 (LPT): 4 -> c0, 3 -> c1, 2 -> c1 (3 < 4), c1 is full,
    # 1 -> c0. Totals 5 and 5. Within a cluster the lighter device goes first.
    devices = _profiles(("a", 4, 1.0), ("b", 3, 1.0), ("c", 2, 1.0), ("d", 1, 1.0))
    assert cluster_devices(devices, 2, "balanced") == [["d", "a"], ["c", "b"]]


def test_balanced_clustering_uses_compute():
    # Load = samples / compute: a 2/0.5 = 4, b 3/1 = 3, c 4/2 = 2, d 1/1 = 1 -> same as above.
    devices = _profiles(("a", 2, 0.5), ("b", 3, 1.0), ("c", 4, 2.0), ("d", 1, 1.0))
    assert cluster_devices(devices, 2) == [["d", "a"], ["c", "b"]]


def test_balanced_clustering_uneven():
    # 5 devices, size 2 -> 3 clusters. Loads 9, 5, 4, 3, 1: 9 -> c0, 5 -> c1, 4 -> c2, 3 -> c2 (4 < 5),
    # 1 -> c1 (c2 is full; c1 = 5 < c0 = 9). Totals 9, 6, 7.
    devices = _profiles(("e", 1, 1), ("a", 9, 1), ("c", 4, 1), ("b", 5, 1), ("d", 3, 1))
    assert cluster_devices(devices, 2) == [["a"], ["e", "b"], ["d", "c"]]


def test_sequential_clustering():
    devices = _profiles(*[(d, 1, 1.0) for d in "abcde"])
    assert cluster_devices(devices, 2, "sequential") == [["a", "b"], ["c", "d"], ["e"]]
    assert cluster_devices(devices, 5, "sequential") == [list("abcde")]
    assert cluster_devices(devices, 1, "sequential") == [[d] for d in "abcde"]
    assert cluster_devices([], 2) == []


def test_cluster_size_validation():
    devices = _profiles(("a", 1, 1.0))
    with pytest.raises(ValueError, match="cluster_size must be >= 1, got 0"):
        cluster_devices(devices, 0)
    with pytest.raises(ValueError, match="unknown clustering method 'random'"):
        cluster_devices(devices, 2, "random")
    with pytest.raises(ConfigError, match="invalid value for 'topology.cluster_size'"):
        load_config(TINY_YAML, ["topology.cluster_size=0"])


# ------------------------------------------------------------------------------------ link model
def test_transfer_s_by_hand():
    link = LinkConfig(bandwidth_mbps=8.0, latency_ms=10.0)
    # 1 MB = 8e6 bits at 8e6 bit/s = 1 s, plus 2 messages x 10 ms.
    assert transfer_s(1_000_000, 2, link) == pytest.approx(1.02)
    assert transfer_s(0, 0, link) == 0.0
    assert transfer_s(0, 3, link) == pytest.approx(0.03)


def test_turn_and_clusters_comm_s_by_hand():
    link = LinkConfig(bandwidth_mbps=8.0, latency_ms=10.0)
    u1 = LinkUsage(bytes_up=500_000, bytes_down=500_000, messages_up=1, messages_down=1)  # 1 s + 20 ms
    u2 = LinkUsage(bytes_up=1_000_000, messages_up=1)  # 1 s + 10 ms
    u3 = LinkUsage(bytes_up=3_000_000, messages_up=1)  # 3 s + 10 ms
    assert turn_comm_s(u1, link) == pytest.approx(1.02)
    assert turn_comm_s(u2, link) == pytest.approx(1.01)
    # Members of a cluster add up, clusters run in parallel: max(1.02 + 1.01, 3.01).
    assert clusters_comm_s([[u1, u2], [u3]], link) == pytest.approx(3.01)
    assert clusters_comm_s([[u1, u2], [u2]], link) == pytest.approx(2.03)
    assert clusters_comm_s([], link) == 0.0


def test_link_usage_add():
    a = LinkUsage(1, 2, 3, 4)
    assert a.add(LinkUsage(10, 20, 30, 40)) == LinkUsage(11, 22, 33, 44)
    assert a == LinkUsage(1, 2, 3, 4)  # add returns a new value


# ------------------------------------------------------------------------------------- planning
def test_devices_by_edge_and_compute():
    topo = load_config(TINY_YAML).topology  # 2 edges x 3 devices, compute [1.0, 0.5] cycled
    assert devices_by_edge(topo) == {"edge-0": ["end-0-0", "end-0-1", "end-0-2"],
                                     "edge-1": ["end-1-0", "end-1-1", "end-1-2"]}
    # Global index e * 3 + d: end-1-0 is device 3 -> 0.5; end-1-1 is 4 -> 1.0.
    assert [device_compute(topo, d) for d in devices_by_edge(topo)["edge-1"]] == [0.5, 1.0, 0.5]


def test_plan_clusters_per_scheme():
    counts = {"end-1-0": 10, "end-1-1": 30, "end-1-2": 12}
    # hfsl, size 2: loads 10/0.5 = 20, 30/1 = 30, 12/0.5 = 24 -> 2 clusters: 30 -> c0, 24 -> c1,
    # 20 -> c1 (24 < 30); c1 lighter first.
    hfsl = load_config(TINY_YAML)
    assert plan_clusters(hfsl, "edge-1", counts) == {"edge-1/c0": ["end-1-1"],
                                                     "edge-1/c1": ["end-1-0", "end-1-2"]}
    seq = load_config(TINY_YAML, ["topology.clustering=sequential"])
    assert plan_clusters(seq, "edge-1", counts) == {"edge-1/c0": ["end-1-0", "end-1-1"],
                                                    "edge-1/c1": ["end-1-2"]}
    fl = load_config(TINY_YAML, ["training.scheme=fl"])
    assert plan_clusters(fl, "edge-1", counts) == {"edge-1/c0": ["end-1-0"], "edge-1/c1": ["end-1-1"],
                                                   "edge-1/c2": ["end-1-2"]}
    sl = load_config(TINY_YAML, ["training.scheme=sl"])
    assert plan_clusters(sl, "edge-1", counts) == {"edge-1/c0": ["end-1-0", "end-1-1", "end-1-2"]}


def test_device_seed_is_stable_and_distinct():
    cfg = load_config(TINY_YAML, ["training.seed=2"])
    assert device_seed(cfg, "end-1-2") == 2 * 1_000_003 + 1 * 10_007 + 2
    seeds = {device_seed(cfg, d) for ds in devices_by_edge(cfg.topology).values() for d in ds}
    assert len(seeds) == cfg.topology.num_devices


# ---------------------------------------------------------------------------- the whole cycle
@pytest.fixture(scope="module")
def hfsl_run(tmp_path_factory):
    """3 HFSL rounds in one process; keeps the initial eval and every round's metrics."""
    cfg = load_config(TINY_YAML, TINY)
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
        cfg = load_config(TINY_YAML, [*TINY, "topology.edges=1", "topology.devices_per_edge=3",
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


# ---------------------------------------------------------------------------------- robustness
@pytest.fixture()
def cloud(tmp_path):
    cfg = load_config(TINY_YAML, [*TINY, "data.eval_samples_per_domain=1"])
    cloud = CloudCore(cfg, tmp_path)
    cloud.initial_knowledge()
    return cloud


def _update(edge: str, adapter: dict, num_samples: int, loss: float) -> EdgeUpdate:
    return EdgeUpdate(edge_id=edge, adapter=adapter, num_samples=num_samples, clusters=[[f"end-{edge[-1]}-0"]],
                      device_samples={f"end-{edge[-1]}-0": num_samples}, losses=[loss],
                      end_edge=LinkUsage(bytes_up=100, bytes_down=50), modeled_comm_s=0.5, wall_s=0.1)


def test_nan_update_is_rejected_and_nothing_is_lost(cloud):
    store = cloud.store
    before = {k: v.clone() for k, v in cloud.knowledge.items()}
    good = {k: v + 1.0 for k, v in before.items()}
    bad = {k: v + 4.0 for k, v in before.items()}
    nan_key = sorted(bad)[5]
    bad[nan_key] = bad[nan_key].clone()
    bad[nan_key][0, 0] = float("nan")
    with pytest.raises(NonFiniteUpdateError) as info:
        cloud.aggregate_round(1, [_update("edge-0", good, 10, 1.0), _update("edge-1", bad, 30, 3.0)])
    err = info.value
    assert err.source == "edge-1"
    assert err.key == nan_key
    assert "'edge-1'" in str(err)
    # Nothing changed: version, knowledge, the live adapter, the store.
    assert store.latest_version() == 0
    assert cloud.version == 0
    assert not (store.root / "v0001").exists()
    for k, v in before.items():
        assert torch.equal(cloud.knowledge[k], v)
    live = adapter_state(cloud.peft)
    for k, v in before.items():
        assert torch.equal(live[k], v)

    # The next, clean round still works: FedAvg by hand, (10 * (x + 1) + 30 * (x + 4)) / 40 = x + 3.25.
    bad[nan_key] = before[nan_key] + 4.0
    knowledge, metrics = cloud.aggregate_round(1, [_update("edge-0", good, 10, 1.0), _update("edge-1", bad, 30, 3.0)])
    assert store.latest_version() == 1 and cloud.version == 1
    for k, v in before.items():
        torch.testing.assert_close(knowledge[k], v + 3.25)
    assert metrics["train_loss"] == pytest.approx(2.0)  # mean of the steps' losses [1.0, 3.0]
    assert metrics["bytes"]["end_edge_up"] == 200 and metrics["bytes"]["end_edge_down"] == 100
    assert metrics["bytes"]["edge_cloud_up"] == 2 * FULL_ADAPTER
    lin = store.lineage(1)
    assert lin["parent_version"] == 0 and lin["num_samples"] == 40
    assert lin["edges"]["edge-1"] == {"clusters": [["end-1-0"]], "device_samples": {"end-1-0": 30},
                                      "num_samples": 30}


def test_update_missing_a_key_is_rejected_naming_the_edge(cloud):
    partial = dict(cloud.knowledge)
    dropped = sorted(partial)[0]
    del partial[dropped]
    with pytest.raises(KeyMismatchError) as info:
        cloud.aggregate_round(1, [_update("edge-0", dict(cloud.knowledge), 1, 1.0), _update("edge-1", partial, 1, 1.0)])
    assert "edge-1" in info.value.mismatches
    assert info.value.mismatches["edge-1"] == ((dropped,), ())
    assert cloud.store.latest_version() == 0 and cloud.version == 0


def test_eval_every_skips_rounds_but_not_the_last(tmp_path):
    cfg = load_config(TINY_YAML, [*TINY, "data.eval_samples_per_domain=1", "training.eval_every=2"])
    cloud = CloudCore(cfg, tmp_path)
    x = cloud.initial_knowledge()
    upd = lambda: [_update("edge-0", {k: v + 0.5 for k, v in x.items()}, 1, 1.0)]  # noqa: E731
    # rounds = 3: round 1 is skipped, round 2 is due (2 % 2 == 0), round 3 is the last.
    assert [bool(cloud.aggregate_round(r, upd())[1]["eval"]) for r in (1, 2, 3)] == [False, True, True]
    assert cloud.store.versions() == [0, 1, 2, 3]


# --------------------------------------------------------------------------- trainers, directly
@pytest.fixture(scope="module")
def small_package():
    model, tok = build_foundation(load_config(TINY_YAML).model)
    return FoundationPackage.from_model(model, tok)


def test_device_batches_cover_the_data_once_per_epoch(small_package):
    cfg = load_config(TINY_YAML, TINY)
    dev = device_trainer(cfg, "end-0-1", small_package)
    assert dev.num_samples == 16
    rows = [dev._next_batch()[0] for _ in range(2)]  # 2 batches of 8 = one epoch of 16
    assert all(r.shape == (8, 48) for r in rows)
    seen = torch.cat(rows)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, dev._input_ids.tolist()))
    # Same seed, same order.
    twin = device_trainer(cfg, "end-0-1", small_package)
    assert torch.equal(twin._next_batch()[0], rows[0])


def test_turn_result_bytes_and_messages(small_package):
    cfg = load_config(TINY_YAML, [*TINY, "training.local_steps=2"])
    edge = edge_trainer(cfg, "edge-0", ["end-0-0"], small_package)
    dev = device_trainer(cfg, "end-0-0", small_package)
    full = adapter_state(build_tier_model(small_package, cfg.peft, ModelPart.of(None, True, True)).peft)
    cid = "edge-0/c0"
    edge.begin_round(full, {cid: ["end-0-0"]})
    adapter = edge.begin_turn(cid, "end-0-0", None)
    assert {layer_of_key(k) for k in adapter} == {0, 3}
    assert sum(v.numel() * 4 for v in adapter.values()) == DEVICE_ADAPTER
    turn = dev.train_turn(adapter, DirectEdgeLink(edge, cid, "end-0-0"), cid, 2)
    # 2 steps x 2 tensors of (8, 48, 64) float32 each way, plus the adapter part once each way.
    assert turn.link == LinkUsage(bytes_up=2 * 2 * ACT + DEVICE_ADAPTER, bytes_down=2 * 2 * ACT + DEVICE_ADAPTER,
                                  messages_up=5, messages_down=5)
    assert len(turn.losses) == 2 and turn.num_samples == 16
    assert turn.device_id == "end-0-0" and turn.cluster_id == cid
    assert set(turn.adapter) == set(adapter)


def test_fl_edge_holds_no_model(small_package):
    cfg = load_config(TINY_YAML, [*TINY, "training.scheme=fl"])
    assert edge_trainer(cfg, "edge-0", ["end-0-0"], small_package).split is None
    dev = device_trainer(cfg, "end-0-0", small_package)
    assert dev.cut is None and dev.split.held_layers() == {0, 1, 2, 3}


def test_edge_and_device_misuse_errors(small_package):
    cfg = load_config(TINY_YAML, TINY)
    edge = edge_trainer(cfg, "edge-0", ["end-0-0"], small_package)
    with pytest.raises(ValueError, match=r"edge-0: cluster edge-0/c0 names devices it does not serve: \['end-1-0'\]"):
        edge.begin_round({}, {"edge-0/c0": ["end-1-0"]})
    edge.begin_round({}, {"edge-0/c0": ["end-0-0"]})
    with pytest.raises(RuntimeError, match="end-0-0 has no running turn in cluster edge-0/c0"):
        edge.backward("edge-0/c0", "end-0-0", torch.zeros(1, 4, 64))  # before its turn began
    edge.begin_turn("edge-0/c0", "end-0-0", None)
    with pytest.raises(RuntimeError, match="backward from end-0-0 without a forward"):
        edge.backward("edge-0/c0", "end-0-0", torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match="edge-0: no device finished a turn this round"):
        edge.finish_round({})
    with pytest.raises(ValueError, match=r"results for clusters it does not run: \['edge-0/c9'\]"):
        edge.finish_round({"edge-0/c9": None})
    dev = device_trainer(cfg, "end-0-0", small_package)
    with pytest.raises(ValueError, match="device end-0-0 trains split and needs a link to its edge"):
        dev.train_turn({}, None, "edge-0/c0", 1)


# ---------------------------------------------------------------------------- pretrain and eval
def test_cloud_pretraining_zero_steps_leaves_model_alone(small_package):
    model = small_package.materialize()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = [Example(prompt="1+1=", answer="2", domain="arithmetic")]
    tok = small_package.tokenizer
    with CloudTrainer(model, lr=1e-2) as trainer:
        assert trainer.train(ex, tok, steps=0, batch_size=2, seq_len=16, seed=0) == []
        assert trainer.train([], tok, steps=5, batch_size=2, seq_len=16, seed=0) == []
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        losses = trainer.train(ex * 4, tok, steps=8, batch_size=2, seq_len=16, seed=0)
    assert len(losses) == 8
    assert losses[-1] < losses[0]
    assert not model.training


def test_domain_loss_equals_model_loss(small_package):
    model = small_package.materialize()
    tok = small_package.tokenizer
    examples = [Example(prompt=f"{a}+{a}=", answer=str(2 * a), domain="arithmetic") for a in range(7, 12)]
    batch = encode_examples(examples, tok, 16)
    with torch.no_grad():
        expected = float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    # Answer tokens + eos, averaged over all rows, independent of the eval batch size.
    assert domain_loss(model, tok, examples, 16) == pytest.approx(expected, rel=1e-5)
    assert domain_loss(model, tok, examples, 16, batch_size=2) == pytest.approx(expected, rel=1e-5)
    res = evaluate_domains(model, tok, {"arithmetic": examples}, 16)
    assert set(res) == {"arithmetic"}
    assert res["arithmetic"]["loss"] == pytest.approx(expected, rel=1e-5)
    assert res["arithmetic"]["exact_match"] == 0.0  # a random model does not answer 14


# --------------------------------------------------------------------------------------- audit
def test_message_audit_records_and_dumps(tmp_path):
    audit = MessageAudit("edge-0", enabled=True)
    hidden = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    audit.record("forward", "in", {"hidden": hidden, "cluster": "edge-0/c0"})
    audit.record("finish_round", "out", LinkUsage(bytes_up=7))
    audit.record("begin_round", "in", [object(), 3, None])
    hidden.add_(100)  # the record holds a copy
    path = audit.dump(tmp_path / "audit")
    assert path == tmp_path / "audit" / "edge-0.pt"
    loaded = torch.load(path)
    assert len(loaded) == 3
    assert loaded[0]["node"] == "edge-0" and loaded[0]["method"] == "forward" and loaded[0]["direction"] == "in"
    assert torch.equal(loaded[0]["payload"]["hidden"], torch.arange(6, dtype=torch.float32).reshape(1, 2, 3))
    assert loaded[0]["payload"]["cluster"] == "edge-0/c0"
    assert loaded[1]["payload"] == {"__type__": "LinkUsage", "bytes_up": 7, "bytes_down": 0, "messages_up": 0,
                                    "messages_down": 0}
    assert loaded[2]["payload"] == [{"__type__": "object"}, 3, None]


def test_message_audit_disabled_records_nothing(tmp_path):
    audit = MessageAudit("end-0-0", enabled=False)
    audit.record("forward", "in", torch.ones(2))
    assert audit.records == []
    assert audit.dump(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_run_folder_metrics_are_json(hfsl_run):
    # Round metrics must be JSON as they go to metrics.jsonl.
    for m in hfsl_run["metrics"]:
        assert json.loads(json.dumps(m)) == m
