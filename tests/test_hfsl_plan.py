"""Planning an HFSL round without Ray and without a model: clustering (balanced by load and
compute, sequential, sizes checked), the link model (transfer and turn delays by hand, link usage),
and the round plan per scheme (devices by edge, per-device seeds).
"""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import ConfigError, LinkConfig, load_config
from gaisnet_ray.schemes.clustering import DeviceProfile, cluster_devices
from gaisnet_ray.hfsl.factory import device_seed
from gaisnet_ray.hfsl.linkmodel import clusters_comm_s, transfer_s, turn_comm_s
from gaisnet_ray.hfsl.messages import LinkUsage
from gaisnet_ray.schemes.plan import plan_clusters
from gaisnet_ray.schemes.topology import deal_to_workers, device_compute, devices_by_edge

from tinycfg import TINY_YAML

torch.set_num_threads(1)



# ------------------------------------------------------------------------------ the worker pool
def test_deal_to_workers_keeps_an_edges_devices_together():
    """topology.end_workers: an edge's devices share a worker, so two edges' chains never queue on one
    (round-robin put end-0-0 and end-1-1 on the same worker)."""
    by_edge = {"edge-0": ["end-0-0", "end-0-1", "end-0-2"], "edge-1": ["end-1-0", "end-1-1", "end-1-2"]}
    assert deal_to_workers(by_edge, 2) == {"end-worker-0": ["end-0-0", "end-0-1", "end-0-2"],
                                           "end-worker-1": ["end-1-0", "end-1-1", "end-1-2"]}
    four = deal_to_workers(by_edge, 4)  # sizes 2, 2, 1, 1; every device exactly once, in order
    assert [len(v) for v in four.values()] == [2, 2, 1, 1]
    assert [d for v in four.values() for d in v] == [d for v in by_edge.values() for d in v]
    assert deal_to_workers({"edge-0": ["end-0-0"]}, 3) == {"end-worker-0": ["end-0-0"]}  # no empty worker


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
