"""Secure aggregation inside a real ``fl`` round (``privacy.secure_aggregation``): the round's
knowledge equals the plain round's (to fixed-point tolerance), the edge receives only masked
vectors, a device dropping after the key exchange still yields the survivors' weighted mean, the
sealed shares do not open for the relay or another round, and the configurations where it cannot
work are refused with a ConfigError. One Ray round (under the flock) checks the actor wiring.
"""

from __future__ import annotations

import time

import pytest
import torch

from gaisnet_ray.config import ConfigError
from gaisnet_ray.inprocess import InProcessGaisNet
from gaisnet_ray.privacy.secagg import SCALE, SecAggError, SecAggMember, decode
from gaisnet_ray.privacy.secround import check_secure_aggregation, direct_exchange, flatten, reveal_sets

from tinycfg import tiny_config

torch.set_num_threads(1)

FL_JOB = ("training.scheme=fl", "topology.edges=2", "topology.devices_per_edge=3", "topology.cluster_size=1",
          "data.samples_per_device=24", "data.eval_samples_per_domain=1", "data.public_samples=32",
          "training.pretrain_steps=0", "training.local_steps=2", "training.batch_size=8", "training.rounds=1",
          "relay.policy=none", "run.progress=false")
SECURE = "privacy.secure_aggregation=true"


def _close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=tol, msg=k)


def _weighted_mean(pairs) -> dict:
    """The sample-weighted mean, in float64, of (adapter, num_samples) pairs: what FedAvg of them gives."""
    pairs = list(pairs)
    w = sum(n for _, n in pairs)
    return {k: sum(a[k].double() * n for a, n in pairs) / w for k in pairs[0][0]}


def _close_double(a: dict, b: dict, tol: float = 1e-6) -> None:
    _close({k: v.double() for k, v in a.items()}, {k: v.double() for k, v in b.items()}, tol)


def _capture_edges(net: InProcessGaisNet) -> dict[str, list]:
    """Record every TurnResult each edge is handed at finish_round (what the edge receives)."""
    seen: dict[str, list] = {}
    for e, edge in net.edges.items():
        orig = edge.finish_round

        def spy(last_turns, replies=None, _e=e, _orig=orig):
            seen.setdefault(_e, []).extend(t for t in last_turns.values() if t is not None)
            return _orig(last_turns, replies)

        edge.finish_round = spy
    return seen


def _capture_plain(net: InProcessGaisNet) -> dict[str, dict]:
    """Each device's plain trained adapter (before sealing): what a device holds, never sends."""
    plain: dict[str, dict] = {}
    for d, dev in net.devices.items():
        orig = dev.train_local_turn

        def spy(*a, _d=d, _orig=orig, **kw):
            r = _orig(*a, **kw)
            plain[_d] = {k: v.clone() for k, v in r.adapter.items()}
            return r

        dev.train_local_turn = spy
    return plain


def test_an_fl_round_with_secure_aggregation_equals_one_without_and_the_edge_sees_only_masks(tmp_path):
    plain_net = InProcessGaisNet(tiny_config(*FL_JOB), tmp_path / "plain")
    t0 = time.perf_counter()
    plain_row = plain_net.run_round(1)
    plain_s = time.perf_counter() - t0

    net = InProcessGaisNet(tiny_config(*FL_JOB, SECURE), tmp_path / "secure")
    received, held = _capture_edges(net), _capture_plain(net)
    t0 = time.perf_counter()
    row = net.run_round(1)
    secure_s = time.perf_counter() - t0

    _close(net.knowledge, plain_net.knowledge)  # the same global knowledge, to fixed point (2^-24)
    initial = net.cloud.store.load(0)
    assert any(not torch.equal(net.knowledge[k], initial[k]) for k in initial)  # the round did train
    assert row["privacy"]["secure_aggregation"] is True and plain_row["privacy"]["secure_aggregation"] is False
    # the edge got masked vectors only: no plain adapter, and no masked vector near a device's w * x
    assert sum(len(v) for v in received.values()) == 6
    for edge, turns in received.items():
        for t in turns:
            assert t.adapter == {} and t.masked is not None and t.masked.dtype == torch.int64
            for d, adapter in held.items():
                x = flatten(adapter) * t.num_samples
                diff = (decode(t.masked[:-1]) - x).abs().max()
                assert diff > 1e3, f"{edge} received something close to {d}'s adapter"
    print(f"\nfl round, 2 edges x 3 devices: plain {plain_s:.2f}s, secure {secure_s:.2f}s")


def _keys_exchanged(tmp_path):
    """An in-process fl net with secure aggregation whose edge-0 has begun round 1 and run the key
    exchange with its three devices, each its own cluster: (net, edge, members, clusters, roster)."""
    net = InProcessGaisNet(tiny_config(*FL_JOB, SECURE), tmp_path / "run")
    edge = net.edges["edge-0"]
    members = net.by_edge["edge-0"]
    clusters = {f"edge-0/c{i}": [d] for i, d in enumerate(members)}
    edge.begin_round(net.knowledge, clusters)
    return net, edge, members, clusters, direct_exchange(edge, net.devices, 1, clusters)


def test_a_device_dropping_after_the_key_exchange_leaves_the_survivors_weighted_mean(tmp_path):
    net, edge, members, clusters, roster = _keys_exchanged(tmp_path)
    assert sorted(roster) == sorted(members)
    survivors, gone = members[:2], members[2]  # the third shared its keys, then never sent its update
    plain, masked = {}, {}
    for cid, (d,) in clusters.items():
        if d == gone:
            continue
        dev = net.devices[d]
        adapter = edge.begin_turn(cid, d, None)
        result = dev.train_local_turn(adapter, cid, 2)
        plain[d] = (result.adapter, result.num_samples)
        masked[cid] = dev.secagg.seal(result)
    alive, dropped = reveal_sets(roster, survivors)
    assert dropped == [roster[gone]]
    replies = [net.devices[d].secagg.reveal(alive, dropped) for d in survivors]
    last = {cid: masked.get(cid) for cid in clusters}
    update = edge.finish_round(last, replies)

    _close_double(update.adapter, _weighted_mean(plain.values()))
    assert update.num_samples == sum(n for _, n in plain.values())
    info = update.secure_aggregation
    assert info["members"] == 3 and info["survivors"] == 2 and info["threshold"] == 2
    print(f"\nsecure aggregation, 3 members, 1 dropped: {info}")


def test_a_survivor_lost_before_its_reveal_still_counts_when_threshold_others_reveal(tmp_path):
    net, edge, members, clusters, roster = _keys_exchanged(tmp_path)
    plain, masked = {}, {}
    for cid, (d,) in clusters.items():  # all three send their masked updates ...
        dev = net.devices[d]
        result = dev.train_local_turn(edge.begin_turn(cid, d, None), cid, 2)
        plain[d] = (result.adapter, result.num_samples)
        masked[cid] = dev.secagg.seal(result)
    alive, dropped = reveal_sets(roster, members)
    assert dropped == []
    replies = [net.devices[d].secagg.reveal(alive, dropped) for d in members[:2]]  # ... one is lost before revealing
    update = edge.finish_round(masked, replies)
    # its update is in the sum, and the others' shares remove its self-mask
    _close_double(update.adapter, _weighted_mean(plain.values()))
    assert update.secure_aggregation["survivors"] == 3


def test_too_few_survivors_cannot_unmask(tmp_path):
    net, edge, members, clusters, roster = _keys_exchanged(tmp_path)
    cid, (d,) = next(iter(clusters.items()))
    result = net.devices[d].secagg.seal(net.devices[d].train_local_turn(edge.begin_turn(cid, d, None), cid, 1))
    alive, dropped = reveal_sets(roster, [d])
    with pytest.raises(SecAggError, match="threshold"):
        edge.finish_round({c: (result if c == cid else None) for c in clusters},
                          [net.devices[d].secagg.reveal(alive, dropped)])


def test_sealed_shares_open_only_for_their_recipient_and_round():
    members = [SecAggMember(i, 3, 2) for i in range(3)]
    roster = {m.index: m.public_key for m in members}
    channels = {m.index: m.channel_key for m in members}
    sealed = members[0].sealed_shares(roster, channels, b"round-1")
    assert set(sealed) == {1, 2}
    members[1].open_shares({0: sealed[1]}, channels, b"round-1")  # the recipient opens it
    with pytest.raises(SecAggError, match="does not open"):
        members[2].open_shares({0: sealed[1]}, channels, b"round-1")  # misrouted
    with pytest.raises(SecAggError, match="does not open"):
        members[2].open_shares({0: sealed[2]}, channels, b"round-2")  # replayed into another round
    raw = sealed[2]
    with pytest.raises(SecAggError):
        members[2].open_shares({0: raw[:-1] + bytes([raw[-1] ^ 1])}, channels, b"round-1")  # tampered


@pytest.mark.parametrize("changes, match", [
    (("training.scheme=hfsl", "topology.cluster_size=2"), "relays each member's adapter"),
    (("training.scheme=sl",), "relays each member's adapter"),
    (("training.aggregation=median",), "masked inputs"),
    (("training.clip_norm=1.0",), "clip_norm"),
    (("topology.devices_per_edge=1",), "fewer than 2 devices"),
    (("training.participants_per_edge=1",), "participants_per_edge"),
])
def test_configurations_it_cannot_protect_are_refused(changes, match):
    cfg = tiny_config(*FL_JOB, SECURE, *changes)
    with pytest.raises(ConfigError, match=match):
        check_secure_aggregation(cfg)
    check_secure_aggregation(tiny_config(*FL_JOB, *changes))  # off: nothing to refuse


def test_gaisnet_run_refuses_it_under_hfsl_with_one_line_before_ray(tmp_path, capsys):
    from gaisnet_ray.cli import main
    from tinycfg import TINY_YAML

    rc = main(["run", str(TINY_YAML), "--set", SECURE, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("config error: privacy.secure_aggregation")
    assert "relays each member's adapter" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_the_fixed_point_scale_is_fine_enough_for_the_tolerance():
    assert 1 / SCALE < 1e-6


@pytest.mark.ray
def test_a_ray_fl_round_with_secure_aggregation_matches_the_in_process_one(ray_local, tmp_path):
    from gaisnet_ray.driver import GaisNetDriver

    cfg = tiny_config(*FL_JOB, SECURE, "topology.devices_per_edge=2", "topology.end_workers=2",
                      "run.actor_timeout_s=120")
    driver = GaisNetDriver(cfg, tmp_path / "ray")  # a worker pool: each worker hosts devices of both edges
    try:
        driver.start()
        t0 = time.perf_counter()
        row = driver.run_round(1)
        ray_s = time.perf_counter() - t0
        ray_knowledge = ray_local.get(driver.knowledge_ref, timeout=120)
    finally:
        driver.close()
    net = InProcessGaisNet(tiny_config(*FL_JOB, SECURE, "topology.devices_per_edge=2"), tmp_path / "inproc")
    net.run_round(1)
    _close(ray_knowledge, net.knowledge)
    assert row["privacy"]["secure_aggregation"] is True
    print(f"\nRay fl round with secure aggregation, 2 edges x 2 devices on 2 workers: {ray_s:.2f}s")


def _ray_secure_round_with_a_loss(ray_local, run_dir, sets: tuple, victim: str,
                                  after_exchange: bool) -> tuple[dict, dict]:
    """One Ray round of the fl job (``FL_JOB`` + ``sets``) under secure aggregation that loses
    ``victim`` (a device or an edge of the driver), killed in its edge's key exchange: just after it
    (``after_exchange``: a device whose masks the survivors must then remove) or as it begins (an
    edge, which relays that exchange). Returns (the round's knowledge, its metrics row)."""
    from gaisnet_ray.driver import GaisNetDriver

    cfg = tiny_config(*FL_JOB, *sets, SECURE)
    driver = GaisNetDriver(cfg, run_dir)
    try:
        driver.start()
        actor = driver.devices.get(victim) or driver.edges[victim]
        at_edge = victim if victim in driver.edges else next(e for e, ds in driver.members.items() if victim in ds)
        exchange = driver._exchange_keys

        def exchange_with_a_death(edge, round_idx, clusters):
            if edge == at_edge and not after_exchange:
                ray_local.kill(actor)
            roster = exchange(edge, round_idx, clusters)
            if edge == at_edge and after_exchange:
                ray_local.kill(actor)
            return roster

        driver._exchange_keys = exchange_with_a_death
        row = driver.run_round(1)
        return ray_local.get(driver.knowledge_ref, timeout=120), row
    finally:
        driver.close()


def _plain_mean_of(run_dir, sets: tuple, survivors: list[str]) -> dict:
    """What a plain round that lost everyone but ``survivors`` gives, worked out in one process: the
    fl job's round (``FL_JOB`` + ``sets``, every device training from the same knowledge, as on Ray),
    then the sample-weighted mean of the survivors' trained adapters. With one edge delivering, the
    cloud's FedAvg of its one update is that update."""
    net = InProcessGaisNet(tiny_config(*FL_JOB, *sets), run_dir)
    held = _capture_plain(net)
    net.run_round(1)
    return _weighted_mean((held[d], net.devices[d].num_samples) for d in survivors)


# one edge of 3 EndNodes (within the test cluster's 4 end slots); end-0-2 dies after the exchange
_DEVICE_DIES = dict(sets=("topology.edges=1", "run.actor_timeout_s=120"), victim="end-0-2", after_exchange=True)
# 2 edges x 2 devices on a pool of 2 workers; edge-1 dies as its exchange begins
_EDGE_DIES = dict(sets=("topology.devices_per_edge=2", "topology.end_workers=2", "run.actor_timeout_s=300"),
                  victim="edge-1", after_exchange=False)


@pytest.mark.ray
def test_on_ray_a_device_killed_after_the_key_exchange_leaves_the_survivors_mean(ray_local, tmp_path):
    knowledge, row = _ray_secure_round_with_a_loss(ray_local, tmp_path / "secure", **_DEVICE_DIES)
    assert "end-0-2" in row["faults"]["dropped"]
    info = row["privacy"]["secure_aggregation_edges"]["edge-0"]
    assert info["members"] == 3 and info["survivors"] == 2
    # the survivors' weighted mean, as a plain round without the victim
    _close_double(knowledge, _plain_mean_of(tmp_path / "plain", ("topology.edges=1",), ["end-0-0", "end-0-1"]))


@pytest.mark.ray
def test_on_ray_a_survivor_killed_before_its_reveal_still_gives_the_whole_mean(ray_local, tmp_path):
    from gaisnet_ray.driver import GaisNetDriver

    cfg = tiny_config(*FL_JOB, "topology.edges=1", "run.actor_timeout_s=120", SECURE)
    driver = GaisNetDriver(cfg, tmp_path / "ray")
    try:
        driver.start()
        gather = driver._gather

        def die_then_gather(refs, what):
            if "unmasking" in what:  # every turn is in; end-0-2 dies before its reveal reaches the edge
                ray_local.kill(driver.devices["end-0-2"])
            return gather(refs, what)

        driver._gather = die_then_gather
        row = driver.run_round(1)
        knowledge = ray_local.get(driver.knowledge_ref, timeout=120)
    finally:
        driver.close()
    info = row["privacy"]["secure_aggregation_edges"]["edge-0"]
    assert info["members"] == 3 and info["survivors"] == 3  # its masked update counted
    net = InProcessGaisNet(tiny_config(*FL_JOB, "topology.edges=1"), tmp_path / "inproc")  # plain, no one lost
    net.run_round(1)
    _close(knowledge, net.knowledge)


@pytest.mark.ray
def test_on_ray_an_edge_lost_during_the_key_exchange_leaves_the_other_edges_round(ray_local, tmp_path):
    """The edge relaying the key exchange dies in it: the round is not lost. That edge is reported
    lost (its devices move per faults.edge_failure), the other edge's secure sum goes to the cloud,
    and the knowledge equals a plain round that lost the same edge: the other edge's FedAvg."""
    knowledge, row = _ray_secure_round_with_a_loss(ray_local, tmp_path / "secure", **_EDGE_DIES)
    assert row["faults"]["lost_edges"] == ["edge-1"]
    assert list(row["privacy"]["secure_aggregation_edges"]) == ["edge-0"]
    assert row["privacy"]["secure_aggregation_edges"]["edge-0"]["survivors"] == 2
    _close_double(knowledge, _plain_mean_of(tmp_path / "plain", ("topology.devices_per_edge=2",),
                                            ["end-0-0", "end-0-1"]))
