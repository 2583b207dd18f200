"""The round scheduler without Ray: chains of turns, deadlines that start when a turn starts, a hung
device on a shared worker, dead workers and edges, sit_out vs reassign, and the edge quorum. A fake
clock stands in for time; the actions it returns are what the Ray driver turns into actor calls."""

from __future__ import annotations

import pytest

from gaisnet_ray.schemes.topology import devices_by_edge
from gaisnet_ray.rounds import (
    BeginEdge,
    DropTurn,
    FaultReport,
    FinishEdge,
    RestartHost,
    RoundFailedError,
    RoundMetrics,
    RoundScheduler,
    StartTurn,
)

from tinycfg import tiny_config

TIMEOUT, CALL = 10.0, 60.0  # faults.turn_timeout_s, run.actor_timeout_s


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _scheduler(edges: int, per_edge: int, cluster_size: int, hosts=None, *extra: str):
    cfg = tiny_config(f"topology.edges={edges}", f"topology.devices_per_edge={per_edge}",
                      f"topology.cluster_size={cluster_size}", f"faults.turn_timeout_s={TIMEOUT}",
                      f"run.actor_timeout_s={CALL}", *extra)
    by_edge = devices_by_edge(cfg.topology)
    devices = [d for ds in by_edge.values() for d in ds]
    clock = Clock()
    sched = RoundScheduler(cfg, by_edge, hosts(devices) if hosts else {d: d for d in devices},
                           {d: 32 for d in devices}, clock=clock)
    return sched, clock


def _one_worker(devices):
    return {d: "end-worker-0" for d in devices}


def _started(actions) -> list:
    return [a.turn for a in actions if isinstance(a, StartTurn)]


def _kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_a_cluster_trains_in_turn_and_each_member_gets_the_last_finished_turn():
    sched, _ = _scheduler(1, 3, 3)
    acts = sched.begin_round(1)
    (cid, members), = sched.plans["edge-0"].items()
    assert _kinds(acts) == ["BeginEdge", "StartTurn"] and acts[0] == BeginEdge("edge-0", {cid: members})
    first = _started(acts)[0]
    assert first.device == members[0] and acts[1].previous is None
    acts = sched.turn_finished(first)
    second = acts[0].turn
    assert _kinds(acts) == ["StartTurn"] and second.device == members[1] and acts[0].previous == first
    third = sched.turn_finished(second)[0].turn
    assert sched.turn_finished(third) == [FinishEdge("edge-0", {cid: third})]
    assert sched.round_open  # until the edge's update is in
    sched.edge_delivered("edge-0")
    assert not sched.round_open and sched.delivered() == ["edge-0"]
    assert sched.fault_report() == FaultReport()


def test_a_member_whose_turn_fails_sits_out_and_the_next_goes_on_from_the_last_finished():
    sched, _ = _scheduler(1, 3, 3)
    first = _started(sched.begin_round(1))[0]
    second = sched.turn_finished(first)[0].turn
    acts = sched.turn_failed(second, "boom")
    assert acts[0] == DropTurn(second, "turn failed: boom")  # the edge undoes it before the next begins
    assert isinstance(acts[1], StartTurn) and acts[1].previous is None  # first was absorbed at second's start
    third = acts[1].turn
    assert sched.turn_finished(third)[0].last == {third.cluster: third}
    assert sched.fault_report().dropped == {second.device: "turn failed: boom"}
    assert sched.fault_report().dead_devices == []


def test_queued_turns_on_a_shared_worker_start_when_it_is_free_and_their_deadline_with_them():
    sched, clock = _scheduler(2, 1, 1, _one_worker)
    acts = sched.begin_round(1)
    assert _kinds(acts) == ["BeginEdge", "StartTurn", "BeginEdge"]  # edge-1's turn waits for the worker
    first = _started(acts)[0]
    assert sched.next_deadline() == clock.t + TIMEOUT
    clock.t += TIMEOUT - 1
    assert sched.expire() == []
    acts = sched.turn_finished(first)
    assert _kinds(acts) == ["FinishEdge", "StartTurn"]
    queued = _started(acts)[0]
    assert queued.device == "end-1-0" and sched.next_deadline() == clock.t + TIMEOUT  # not from the round's start
    clock.t += TIMEOUT - 1  # 2 * TIMEOUT - 2 since the round began: still in time
    assert sched.expire() == []
    sched.edge_delivered("edge-0")
    sched.turn_finished(queued)
    sched.edge_delivered("edge-1")
    assert sched.delivered() == ["edge-0", "edge-1"] and sched.fault_report().dropped == {}


def test_a_hung_device_on_a_shared_worker_costs_the_others_one_timeout_and_a_restart():
    sched, clock = _scheduler(1, 2, 1, _one_worker)
    hung = _started(sched.begin_round(1))[0]
    clock.t += TIMEOUT
    acts = sched.expire()
    assert acts == [DropTurn(hung, f"timed out after {TIMEOUT:g}s"),
                    RestartHost("end-worker-0", ("end-0-0", "end-0-1"))]
    assert sched.stalled_hosts == set()
    assert sched.next_deadline() == clock.t + CALL  # the restart's
    clock.t += 3  # the fresh worker is up: the waiting turn starts now, with a full timeout
    acts = sched.host_ready("end-worker-0")
    other = _started(acts)[0]
    assert other.device != hung.device and sched.next_deadline() == clock.t + TIMEOUT
    acts = sched.turn_finished(other)
    assert acts == [FinishEdge("edge-0", {hung.cluster: None, other.cluster: other})]
    report = sched.fault_report()
    assert report.dropped == {hung.device: "timed out after 10s"} and report.dead_devices == []  # slow is not dead


def test_a_late_result_from_a_dropped_turn_is_ignored():
    sched, clock = _scheduler(1, 2, 2)
    hung = _started(sched.begin_round(1))[0]
    clock.t += TIMEOUT
    acts = sched.expire()
    assert _kinds(acts) == ["DropTurn", "StartTurn"]  # one device per actor: nothing to restart
    assert sched.stalled_hosts == {hung.host}  # its hung call may still run: not waited on after the round
    nxt = acts[1].turn
    assert sched.turn_finished(hung) == [] and sched.turn_failed(hung, "late") == []
    assert sched.turn_finished(nxt)[0].last == {nxt.cluster: nxt}


def test_a_worker_that_does_not_come_back_takes_its_devices_out_and_the_round_fails():
    sched, clock = _scheduler(1, 2, 1, _one_worker)
    hung = _started(sched.begin_round(1))[0]
    clock.t += TIMEOUT
    sched.expire()
    clock.t += CALL
    acts = sched.expire()
    waiting = next(d for d in ("end-0-0", "end-0-1") if d != hung.device)
    assert _kinds(acts) == ["DropTurn", "FinishEdge"] and acts[0].turn.device == waiting
    assert acts[1].last == {hung.cluster: None, acts[0].turn.cluster: None}
    sched.edge_failed("edge-0", "no device finished a turn this round")
    assert sched.fault_report().dead_devices == ["end-0-0", "end-0-1"]
    with pytest.raises(RoundFailedError, match=r"round 1: 0 edge update\(s\), faults.min_edge_updates is 1"):
        sched.delivered()


def test_a_dead_worker_drops_its_waiting_turns_at_once():
    sched, _ = _scheduler(2, 1, 1, _one_worker)
    first = _started(sched.begin_round(1))[0]
    acts = sched.turn_failed(first, "ActorDiedError", host_died=True)
    assert [(type(a).__name__, getattr(a, "turn", None) and a.turn.device) for a in acts] == [
        ("DropTurn", "end-0-0"), ("DropTurn", "end-1-0"), ("FinishEdge", None), ("FinishEdge", None)]
    assert sched.fault_report().dropped == {"end-0-0": "died: ActorDiedError", "end-1-0": "died: ActorDiedError"}
    assert "end-worker-0" in sched.dead_hosts
    for e in ("edge-0", "edge-1"):
        sched.edge_failed(e, "no device finished a turn this round")
    assert not sched.round_open
    assert sched.begin_round(2) == [] and sched.plans == {}  # dead devices are planned no more


def test_an_edge_lost_mid_round_sits_its_clusters_out_and_reassign_moves_its_devices():
    sched, _ = _scheduler(2, 2, 2, None, "faults.edge_failure=reassign")
    first0, first1 = _started(sched.begin_round(1))
    acts = sched.turn_failed(first1, "ActorDiedError", edge_died=True)
    assert acts == []  # nothing for the dead edge, and its next member never starts
    assert sched.fault_report().dropped == {first1.device: "its edge edge-1 died"}
    second0 = sched.turn_finished(first0)[0].turn
    sched.turn_finished(second0)
    sched.edge_delivered("edge-0")
    assert not sched.round_open and sched.delivered() == ["edge-0"]
    for move in sched.reassignments():
        assert move.target == "edge-0"
        sched.moved(move)
    report = sched.fault_report()
    assert report.lost_edges == ["edge-1"] and report.dead_edges == ["edge-1"]
    assert report.reassigned == {"end-1-0": "edge-0", "end-1-1": "edge-0"}
    sched.begin_round(2)
    assert list(sched.plans) == ["edge-0"]
    assert sorted(d for ms in sched.plans["edge-0"].values() for d in ms) == [
        "end-0-0", "end-0-1", "end-1-0", "end-1-1"]


def test_under_sit_out_a_lost_edges_devices_stay_out():
    sched, _ = _scheduler(2, 2, 2, None, "faults.edge_failure=sit_out")
    first0, first1 = _started(sched.begin_round(1))
    sched.turn_failed(first1, "ActorDiedError", edge_died=True)
    sched.turn_finished(sched.turn_finished(first0)[0].turn)
    sched.edge_delivered("edge-0")
    assert list(sched.reassignments()) == [] and sched.fault_report().reassigned == {}
    sched.begin_round(2)
    assert list(sched.plans) == ["edge-0"] and sched.members["edge-1"] == ["end-1-0", "end-1-1"]


def test_reassign_goes_to_the_survivor_with_the_fewest_devices_and_an_unconfirmed_move_drops_out():
    sched, _ = _scheduler(3, 2, 2, None, "faults.edge_failure=reassign")
    firsts = _started(sched.begin_round(1))
    sched.turn_failed(firsts[2], "ActorDiedError", edge_died=True)
    for t in firsts[:2]:
        sched.turn_finished(sched.turn_finished(t)[0].turn)
    sched.edge_delivered("edge-0")
    sched.edge_delivered("edge-1")
    moves = sched.reassignments()
    first = next(moves)
    assert (first.device, first.target) == ("end-2-0", "edge-0")  # a tie: by name
    sched.moved(first)
    second = next(moves)
    assert (second.device, second.target) == ("end-2-1", "edge-1")  # edge-0 has three now
    assert list(moves) == []  # end-2-1's move failed (not confirmed): it is out of the run
    assert sched.fault_report().reassigned == {"end-2-0": "edge-0"}
    assert "end-2-1" not in [d for ds in sched.members.values() for d in ds]


def test_fewer_edge_updates_than_min_edge_updates_fail_the_round():
    sched, _ = _scheduler(2, 1, 1, None, "faults.min_edge_updates=2")
    t0, t1 = _started(sched.begin_round(1))
    sched.turn_finished(t0)
    sched.turn_finished(t1)
    sched.edge_delivered("edge-0")
    sched.edge_failed("edge-1", "KnowledgeError: NaN in edge-1's update")
    with pytest.raises(RoundFailedError, match=r"1 edge update\(s\), faults.min_edge_updates is 2.*--resume"):
        sched.delivered()


def test_an_edge_that_does_not_deliver_within_a_call_timeout_is_given_up():
    sched, clock = _scheduler(1, 1, 1)
    sched.turn_finished(_started(sched.begin_round(1))[0])
    assert sched.next_deadline() == clock.t + CALL
    clock.t += CALL
    assert sched.expire() == [] and not sched.round_open
    with pytest.raises(RoundFailedError):
        sched.delivered()


def test_without_deadlines_nothing_times_out():
    cfg = tiny_config("topology.edges=1", "topology.devices_per_edge=2")
    by_edge = devices_by_edge(cfg.topology)
    sched = RoundScheduler(cfg, by_edge, {d: d for d in by_edge["edge-0"]}, {d: 8 for d in by_edge["edge-0"]},
                           deadlines=False)
    sched.begin_round(1)
    assert sched.next_deadline() is None and sched.expire() == []


def test_the_metrics_row_is_laid_out_in_one_place():
    cloud = {"round": 1, "train_loss": 2.0, "relay": {"policy": "merge"}, "eval": {}}
    faults = FaultReport({"end-0-1": "timed out after 4s"}, [], {}, [], [])
    row = RoundMetrics(cloud, relay_down={"edge_cloud_down": 5}, faults=faults, peak_rss_mb={"all_actors": 1.0},
                       wall_s=3.5, plan={"modeled_round_s": 1.0}).row()
    assert list(row) == ["round", "train_loss", "relay", "eval", "faults", "peak_rss_mb", "wall_s", "plan"]
    assert row["relay"] == {"policy": "merge", "bytes_down": {"edge_cloud_down": 5}}
    assert row["faults"]["dropped"] == {"end-0-1": "timed out after 4s"}
    assert cloud["relay"] == {"policy": "merge"}  # the cloud's dict is not mutated
    assert list(RoundMetrics({"round": 1}).row()) == ["round"]  # the in-process runtime adds no faults
