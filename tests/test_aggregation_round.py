"""The robust aggregation rules inside a real round (in-process, no Ray): with ``training.aggregation``
median or trimmed_mean the global version a round publishes is exactly that rule applied to the
edges' updates the round produced (each edge's own adapter is kept in knowledge/edges/<edge>/), the
lineage names the rule, and the result differs from plain FedAvg; with ``training.clip_norm`` every
update of the round, the edges' and the published one, stays within the bound.

Five edges with one device each: the median (the middle value) and the 20% trimmed mean (the mean
of the middle three) then differ from each other and from the weighted mean.
"""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.inprocess import InProcessGaisNet
from gaisnet_ray.knowledge import KnowledgeStore, aggregate

from conftest import small_job
from tinycfg import tiny_config

torch.set_num_threads(1)

EDGES = 5
ROUND = small_job(f"topology.edges={EDGES}", "data.samples_per_device=16", "data.eval_samples_per_domain=1",
                  "relay.policy=none")


def _round(tmp_path, *rule: str):
    """One round of the five-edge job under ``rule``: (config, global v1, edge updates, their weights,
    v0's adapter, lineage of v1)."""
    cfg = tiny_config(*ROUND, *rule)
    run = tmp_path / "run"
    InProcessGaisNet(cfg, run).run_round(1)
    store = KnowledgeStore(run / "knowledge")
    lineage = store.lineage(1)
    edges = sorted(lineage["edges"])
    assert len(edges) == EDGES
    updates = [KnowledgeStore(run / "knowledge" / "edges" / e).load(1) for e in edges]
    weights = [float(lineage["edges"][e]["num_samples"]) for e in edges]
    return cfg, store.load(1), updates, weights, store.load(0), lineage, edges


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def _norm_from(state: dict, reference: dict) -> float:
    return float(torch.cat([(state[k] - reference[k]).flatten() for k in state]).norm())


@pytest.mark.parametrize("rule", [
    ("training.aggregation=median",),
    ("training.aggregation=trimmed_mean", "training.trim_ratio=0.2"),
], ids=["median", "trimmed_mean"])
def test_the_round_publishes_the_rule_applied_to_the_edges_updates(tmp_path, rule):
    cfg, published, updates, weights, reference, lineage, edges = _round(tmp_path, *rule)
    t = cfg.training
    assert lineage["aggregation"] == t.aggregation
    expected = aggregate(t.aggregation, updates, weights, reference=reference, trim_ratio=t.trim_ratio,
                         sources=edges)
    _assert_equal_states(published, expected)
    assert _differs(published, aggregate("fedavg", updates, weights)), f"{rule} gave plain FedAvg's result"


def test_clip_norm_bounds_every_update_of_the_round(tmp_path):
    """``training.clip_norm`` clips each update's change from the round's starting knowledge (v0):
    the edges clip their devices' updates, the cloud the edges' (a no-op then, and still applied).
    The same round without clipping moves each edge far past the bound."""
    clip = 0.001
    cfg, published, updates, weights, reference, lineage, edges = _round(tmp_path / "clip",
                                                                         f"training.clip_norm={clip}")
    assert lineage["aggregation"] == "fedavg" and cfg.training.clip_norm == clip
    for e, u in zip(edges, updates):
        assert _norm_from(u, reference) <= clip * (1 + 1e-5), e
    expected = aggregate("fedavg", updates, weights, reference=reference, clip_norm=clip, sources=edges)
    _assert_equal_states(published, expected)
    assert _norm_from(published, reference) <= clip * (1 + 1e-5)
    _, free, free_updates, *_ = _round(tmp_path / "free")
    assert min(_norm_from(u, reference) for u in free_updates) > 10 * clip
    assert _norm_from(free, reference) > 10 * clip


def test_median_and_trimmed_mean_are_not_the_same_rule_here(tmp_path):
    """With five updates the median and the 20% trimmed mean are different functions: the check
    above cannot pass for one by computing the other."""
    _, _, updates, weights, reference, _, edges = _round(tmp_path)
    median = aggregate("median", updates, weights, reference=reference, sources=edges)
    trimmed = aggregate("trimmed_mean", updates, weights, reference=reference, trim_ratio=0.2, sources=edges)
    assert _differs(median, trimmed)


def test_server_lr_takes_the_global_step_along_the_edges_average(tmp_path):
    """``training.server_lr`` 2: the published version is v0 + 2 x (FedAvg of the edges - v0)
    (FedOpt's global step), so it lies twice as far from v0 as the plain average does."""
    cfg, published, updates, weights, reference, lineage, edges = _round(tmp_path, "training.server_lr=2")
    mean = aggregate("fedavg", updates, weights, reference=reference, sources=edges)
    expected = {k: reference[k] + 2.0 * (mean[k] - reference[k]) for k in mean}
    _assert_equal_states(published, expected)
    assert _norm_from(published, reference) == pytest.approx(2 * _norm_from(mean, reference), rel=1e-5)
