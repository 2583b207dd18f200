"""Schemes and aggregation rules as strategy classes (issue 12, item 3), without Ray or a model:
each scheme's round shape, the one place config picks it, a new scheme added in one class, and
the aggregation rule classes against hand-computed values."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar, get_args

import pytest
import torch

from gaisnet_ray.config import TrainingConfig
from gaisnet_ray.hfsl.factory import edge_cuts, tier_parts
from gaisnet_ray.hfsl.memory import estimate_job
from gaisnet_ray.schemes.plan import plan_clusters
from gaisnet_ray.knowledge.aggregate import (
    RULES,
    Aggregator,
    ClipNorm,
    FedAvg,
    Median,
    TrimmedMean,
    aggregate,
    aggregator_of,
    rule_named,
)
from gaisnet_ray.models.cuts import ModelPart
from gaisnet_ray.schemes import FL, HFSL, SCHEMES, SL, Scheme, scheme_named, scheme_of

sys.path.insert(0, str(Path(__file__).parent))
from tinycfg import tiny_config  # noqa: E402

N = 4  # blocks of the tiny model; its cut is front 1, back 1 -> the edge runs blocks 1, 2
EDGE0 = ["end-0-0", "end-0-1", "end-0-2"]


# ---------------------------------------------------------------------------------- the registry
def test_every_configurable_scheme_has_a_class_and_nothing_else_does():
    assert set(SCHEMES) == set(get_args(TrainingConfig.model_fields["scheme"].annotation)) == {"hfsl", "fl", "sl", "centralized", "local"}
    for name, cls in SCHEMES.items():
        assert cls.name == name and issubclass(cls, Scheme)
    assert isinstance(scheme_of(tiny_config()), HFSL)
    assert isinstance(scheme_of(tiny_config("training.scheme=fl")), FL)
    assert isinstance(scheme_of(tiny_config("training.scheme=sl")), SL)
    with pytest.raises(ValueError, match="unknown training.scheme 'magic': use one of"):
        scheme_named("magic")


def test_labels_say_which_scheme_runs():
    assert [scheme_named(n).label for n in ("hfsl", "fl", "sl")] == ["HFSL rounds", "FL rounds", "SL rounds"]


# ---------------------------------------------------------------------------- what tiers hold
def test_split_schemes_give_devices_their_cut_and_edges_the_middle():
    cfg = tiny_config()
    for scheme in (HFSL(), SL()):
        assert scheme.splits
        cut = scheme.device_cut(cfg.topology, "end-0-0", N)
        assert (cut.front_end, cut.back_start) == (1, 3)
        assert scheme.device_part(cfg.topology, "end-0-0", N) == ModelPart.of({0, 3}, True, True)
        assert scheme.edge_part(cfg.topology, EDGE0, N) == ModelPart.of({1, 2}, False, False)


def test_fl_devices_hold_the_whole_model_and_edges_nothing():
    cfg = tiny_config("training.scheme=fl")
    parts = tier_parts(cfg, N)
    assert parts["end-1-2"] == ModelPart.whole()
    assert parts["edge-0"] == parts["edge-1"] == ModelPart.of((), False, False)
    assert edge_cuts(cfg, EDGE0, N) == dict.fromkeys(EDGE0)  # no split step with the edge


def test_per_device_cuts_reach_the_edges_part():
    cfg = tiny_config("topology.device_cuts.end-0-1.front_layers=2")
    parts = tier_parts(cfg, N)
    assert parts["end-0-1"] == ModelPart.of({0, 1, 3}, True, True)
    assert parts["edge-0"] == ModelPart.of({1, 2}, False, False)  # end-0-0 still needs block 1 there
    assert parts["edge-1"] == ModelPart.of({1, 2}, False, False)


# --------------------------------------------------------------------------- who trains with whom
COUNTS = {"end-0-0": 16, "end-0-1": 16, "end-0-2": 16}  # compute 1.0, 0.5, 1.0 -> loads 16, 32, 16


def test_clusters_per_scheme():
    assert plan_clusters(tiny_config("training.scheme=fl"), "edge-0", COUNTS) == {
        "edge-0/c0": ["end-0-0"], "edge-0/c1": ["end-0-1"], "edge-0/c2": ["end-0-2"]}
    assert plan_clusters(tiny_config("training.scheme=sl"), "edge-0", COUNTS) == {"edge-0/c0": EDGE0}
    assert plan_clusters(tiny_config(), "edge-0", COUNTS) == {"edge-0/c0": ["end-0-1"],
                                                              "edge-0/c1": ["end-0-0", "end-0-2"]}
    assert plan_clusters(tiny_config("topology.clustering=sequential"), "edge-0", COUNTS) == {
        "edge-0/c0": ["end-0-0", "end-0-1"], "edge-0/c1": ["end-0-2"]}


def test_hfsl_keeps_the_planners_clusters_and_clusters_devices_it_did_not_plan_after_them():
    cfg = tiny_config()
    counts = {**COUNTS, "end-1-0": 16}  # moved here from a lost edge; the plan does not know it
    groups = HFSL().clusters(cfg, "edge-0", counts, planned=[["end-0-2", "end-0-0"], ["end-0-1", "end-0-9"]])
    assert groups == [["end-0-2", "end-0-0"], ["end-0-1"], ["end-1-0"]]
    # FL and SL have no plan to keep: their shape is the scheme's
    assert SL().clusters(cfg, "edge-0", COUNTS, planned=[["end-0-2"], ["end-0-0", "end-0-1"]]) == [EDGE0]


def test_cluster_sizes_and_clusters_in_flight_shape_the_planner_and_the_memory_estimate():
    cfg = tiny_config("topology.devices_per_edge=5")
    assert [s.cluster_size(cfg, 5) for s in (HFSL(), FL(), SL())] == [2, 1, 5]
    assert [s.max_clusters for s in (HFSL(), FL(), SL())] == [None, None, 1]
    assert [s.free_cluster_size for s in (HFSL(), FL(), SL())] == [True, False, False]
    assert [s.clusters_in_flight(cfg, 5) for s in (HFSL(), FL(), SL())] == [3, 0, 1]  # ceil(5 / 2)
    sampled = tiny_config("topology.devices_per_edge=5", "training.participants_per_edge=2")
    assert HFSL().clusters_in_flight(sampled, 5) == 1


# ----------------------------------------------------------------- a new scheme is one class
class Pairs(Scheme):
    """A scheme a test adds: split, clusters of exactly two devices in id order."""

    name: ClassVar[str] = "pairs"

    def cluster_size(self, cfg, devices: int) -> int:
        return 2

    def clusters(self, cfg, edge, sample_counts, planned=None):
        ids = list(sample_counts)
        return [ids[i:i + 2] for i in range(0, len(ids), 2)]


class Alone(Scheme):
    """A scheme a test adds: every device trains the whole model alone (as ``local`` will)."""

    name: ClassVar[str] = "alone"
    splits: ClassVar[bool] = False

    def cluster_size(self, cfg, devices: int) -> int:
        return 1

    def clusters(self, cfg, edge, sample_counts, planned=None):
        return [[d] for d in sample_counts]


@pytest.mark.parametrize("cls", [Pairs, Alone])
def test_a_scheme_added_as_one_class_reaches_every_place_that_asks(monkeypatch, cls):
    monkeypatch.setitem(SCHEMES, cls.name, cls)
    base = tiny_config("topology.clustering=sequential")
    # the config's choices are H4's Literal; model_copy stands in for the one line a new scheme adds there
    cfg = base.model_copy(update={"training": base.training.model_copy(update={"scheme": cls.name})})
    assert isinstance(scheme_of(cfg), cls)
    groups = list(plan_clusters(cfg, "edge-0", COUNTS).values())
    parts = tier_parts(cfg, N)
    model = {"model_type": "gpt2", "n_layer": N, "n_embd": 32, "n_head": 2, "vocab_size": 300, "n_positions": 64}
    edge = estimate_job(cfg, model).by_kind()["edge"]
    if cls is Pairs:
        assert groups == [["end-0-0", "end-0-1"], ["end-0-2"]]
        assert parts["end-0-0"] == ModelPart.of({0, 3}, True, True)
        assert parts["edge-0"] == ModelPart.of({1, 2}, False, False)
        assert edge.breakdown["activations"] > 0
    else:
        assert groups == [[d] for d in EDGE0]
        assert parts["end-0-0"] == ModelPart.whole()
        assert parts["edge-0"] == ModelPart.of((), False, False)
        assert edge.breakdown["activations"] == 0


# ----------------------------------------------------------------------- aggregation rules
def _u(*vals: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(vals, dtype=torch.float32)}


UPDATES = [_u(1.0, 0.0), _u(2.0, 10.0), _u(4.0, 20.0), _u(100.0, -5.0)]
WEIGHTS = [1.0, 1.0, 2.0, 0.0]


def test_rule_registry_matches_the_config_and_the_names():
    assert set(RULES) == set(get_args(TrainingConfig.model_fields["aggregation"].annotation))
    assert [type(rule_named(n)) for n in RULES] == [FedAvg, Median, TrimmedMean]
    assert rule_named("trimmed_mean", trim_ratio=0.25) == TrimmedMean(0.25)
    assert FedAvg.weighted and not Median.weighted and not TrimmedMean.weighted
    with pytest.raises(ValueError, match="unknown aggregation rule 'mode'"):
        rule_named("mode")


def test_rule_classes_compute_the_hand_worked_values():
    # fedavg: (1*1 + 1*2 + 2*4 + 0*100) / 4 = 2.75; (0 + 10 + 40 + 0) / 4 = 12.5
    assert torch.allclose(Aggregator(FedAvg())(UPDATES, WEIGHTS)["w"], torch.tensor([2.75, 12.5]))
    # median of 4: mean of the middle two: (2 + 4) / 2 = 3; (0 + 10) / 2 = 5
    assert torch.allclose(Aggregator(Median())(UPDATES, None)["w"], torch.tensor([3.0, 5.0]))
    # trimmed mean 0.25 of 4: drop 1 at each end: (2 + 4) / 2 = 3; (0 + 10) / 2 = 5
    assert torch.allclose(Aggregator(TrimmedMean(0.25))(UPDATES, WEIGHTS)["w"], torch.tensor([3.0, 5.0]))


def test_clip_runs_before_the_rule_against_the_reference():
    ref = _u(0.0, 0.0)
    # each delta's norm: 1, sqrt(104), sqrt(416), ~100.1 -> clipped to <= 1, then averaged
    out = Aggregator(FedAvg(), ClipNorm(1.0))(UPDATES[:2], [1.0, 1.0], reference=ref)["w"]
    second = torch.tensor([2.0, 10.0]) / torch.tensor([2.0, 10.0]).norm()
    assert torch.allclose(out, (torch.tensor([1.0, 0.0]) + second) / 2)
    with pytest.raises(ValueError, match="no reference"):
        Aggregator(FedAvg(), ClipNorm(1.0))(UPDATES, WEIGHTS)
    with pytest.raises(ValueError, match="clip max_norm must be finite and > 0"):
        Aggregator(Median(), ClipNorm(-1.0))(UPDATES, None, reference=ref)


def test_every_check_comes_before_any_arithmetic_in_the_classes_too():
    with pytest.raises(ValueError, match="no updates to aggregate"):
        Aggregator(FedAvg())([], [])
    with pytest.raises(ValueError, match="rule 'fedavg' requires weights"):
        Aggregator(FedAvg())(UPDATES, None)
    with pytest.raises(ValueError, match="trim_ratio must satisfy"):
        Aggregator(TrimmedMean(0.5))(UPDATES, None)
    with pytest.raises(ValueError, match=r"len\(weights\)"):
        Aggregator(Median())(UPDATES, [1.0])


def test_the_config_chooses_the_rule_in_one_place_and_matches_the_functional_api():
    for extra in ([], ["training.aggregation=median"], ["training.aggregation=trimmed_mean", "training.trim_ratio=0.25"],
                  ["training.clip_norm=3.0"]):
        t = tiny_config(*extra).training
        chosen = aggregator_of(t)
        assert chosen.rule.name == t.aggregation
        assert (chosen.clip is None) == (t.clip_norm is None)
        ref = _u(1.0, 1.0)
        by_class = chosen(UPDATES, WEIGHTS, reference=ref)
        by_name = aggregate(t.aggregation, UPDATES, WEIGHTS, reference=ref, trim_ratio=t.trim_ratio,
                            clip_norm=t.clip_norm)
        assert torch.equal(by_class["w"], by_name["w"])
