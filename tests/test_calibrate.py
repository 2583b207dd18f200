"""The calibrated cascade (``inference.calibrate``): thresholds worked out by hand on synthetic
confidences; a published edge version carries its ``routing.json``, covered by the lineage's
``files_sha256``; a run made without calibration gets a sidecar bound to the weights' content hash;
and the tier router (``serve.router.TierRouter``, driven here with stand-in handles, no Ray)
decides with the answering version's calibrated rule, the fixed ``serve.routing.*`` otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gaisnet_ray.inference.calibrate import (Measured, Observation, calibrate_domain, calibrate_run, in_fold,
                                             lowest_threshold, measure, sidecar_path)
from gaisnet_ray.inference.generate import Generation
from gaisnet_ray.inference.routing import (ROUTING_NAME, CalibratedRule, RoutingPolicy, RoutingTable, policy_for,
                                           route_after_edge)

from servecheck import make_run


# ------------------------------------------------------------------------ the math, by hand
def test_lowest_threshold_keeps_most_while_edge_stays_at_least_as_right_as_cloud():
    # confidence: 0.9  0.8  0.7  0.6  0.5
    # edge right:  1    1    0    1    0
    # cloud right: 1    0    1    1    1     e - c: 0 +1 -1 0 -1
    # kept from the top: sum(e - c) = 0, 1, 0, 0, -1  -> the lowest cut with sum >= 0 is 0.6 (keeps 4)
    obs = [Observation(c, e, k) for c, e, k in
           [(0.9, 1, 1), (0.8, 1, 0), (0.7, 0, 1), (0.6, 1, 1), (0.5, 0, 1)]]
    assert lowest_threshold(obs) == (0.6, 4)
    # tiered EM at 0.6: edge 1+1+0+1, cloud for 0.5: 1 -> 4/5 == cloud-only 4/5
    # the edge never beats the cloud on its most confident answer: always escalate
    assert lowest_threshold([Observation(0.9, False, True), Observation(0.8, True, True)]) == (None, 0)
    # ties go together: two answers at 0.7, one right only at the edge, one only at the cloud -> both kept
    assert lowest_threshold([Observation(0.7, True, False), Observation(0.7, False, True),
                             Observation(0.2, False, True)]) == (0.7, 2)
    assert lowest_threshold([]) == (None, 0)


def test_calibrate_domain_picks_the_signal_that_keeps_more():
    # min_token_prob orders the answers badly (the wrong one is the surest: nothing can be kept);
    # mean entropy orders them well (the wrong one is the least sure): keep 2 at entropy <= 1.0
    edge = [Measured("a", 0.9, 2.0), Measured("b", 0.5, 0.4), Measured("c", 0.4, 1.0)]
    edge_ok, cloud_ok = [False, True, True], [True, True, True]
    cal = calibrate_domain(edge, edge_ok, cloud_ok)
    assert (cal.signal, cal.threshold, cal.kept, cal.samples) == ("mean_entropy", 1.0, 2, 3)
    assert (cal.edge_em, cal.cloud_em, cal.tiered_em) == (2 / 3, 1.0, 1.0)
    # on a tie in kept answers, min_token_prob (tried first) stays
    same = calibrate_domain([Measured("a", 0.9, 0.1)], [True], [True])
    assert (same.signal, same.threshold, same.kept) == ("min_token_prob", 0.9, 1)
    with pytest.raises(ValueError, match="as many edge answers as verdicts"):
        calibrate_domain(edge, [True], cloud_ok)


def test_policy_for_and_calibrated_decisions():
    fixed = RoutingPolicy(max_mean_entropy=0.0, min_token_prob=0.99)  # would escalate everything
    table = RoutingTable.from_json(json.dumps({
        "adapter": "edge-0", "version": 3, "content_hash": "h", "objective": "o", "cloud": {},
        "domains": {"town": {"signal": "min_token_prob", "threshold": 0.4, "samples": 8, "kept": 5,
                             "edge_em": 0.5, "cloud_em": 0.5, "tiered_em": 0.6},
                    "codes": {"signal": "mean_entropy", "threshold": 1.5, "samples": 8, "kept": 3,
                              "edge_em": 0.2, "cloud_em": 0.5, "tiered_em": 0.5},
                    "catalogue": {"signal": "min_token_prob", "threshold": None, "samples": 8, "kept": 0,
                                  "edge_em": 0.0, "cloud_em": 0.5, "tiered_em": 0.5}}}))
    assert policy_for(None, "town", fixed) is fixed and policy_for(table, None, fixed) is fixed
    assert policy_for(table, "capitals", fixed) is fixed  # a domain the table does not name
    gen = lambda entropy, p: Generation("x", [1], "stop", 3, 1, entropy, p)  # noqa: E731
    town = policy_for(table, "town", fixed)
    assert town.rule == CalibratedRule("min_token_prob", 0.4, "edge-0 v0003, domain 'town'")
    keep = route_after_edge(gen(3.0, 0.45), town)
    assert keep.tier == "edge"
    assert "min_token_prob 0.450 >= calibrated 0.400 (edge-0 v0003, domain 'town')" in keep.reason
    up = route_after_edge(gen(0.1, 0.35), town)
    assert (up.tier, up.escalated) == ("cloud", True) and "not >= calibrated 0.400" in up.reason
    codes = policy_for(table, "codes", fixed)
    assert route_after_edge(gen(1.5, 0.01), codes).tier == "edge"
    assert route_after_edge(gen(1.6, 0.99), codes).tier == "cloud"
    never = route_after_edge(gen(0.0, 1.0), policy_for(table, "catalogue", fixed))
    assert never.tier == "cloud" and "never matches the cloud" in never.reason
    with pytest.raises(ValueError, match="unknown confidence signal 'vibes'"):
        CalibratedRule("vibes", 0.5)


def test_folds_split_the_prompts():
    prompts = [f"What is {i} + {i}?" for i in range(200)]
    a = {p for p in prompts if in_fold(p, (0, 2))}
    b = {p for p in prompts if in_fold(p, (1, 2))}
    assert a and b and not (a & b) and a | b == set(prompts) and all(in_fold(p, None) for p in prompts)


# ------------------------------------------------------------- a run that publishes them
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One in-process round of the small tiny job with calibration on (the default)."""
    out = tmp_path_factory.mktemp("calibrate") / "run"
    make_run(out, calibrate=True)
    return out


def test_without_serving_only_the_last_rounds_versions_are_calibrated(tmp_path):
    """`gaisnet run` without --serve (the cloud's calibrate_every_round False): nothing serves a
    version while the run goes on, so only the last round's edge versions get a routing.json."""
    from conftest import small_job
    from gaisnet_ray.config import load_config
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.knowledge.store import KnowledgeStore
    from tinycfg import TINY_YAML

    cfg = load_config(TINY_YAML, small_job("serve.routing.calibrate=true", "training.rounds=2"))
    net = InProcessGaisNet(cfg, tmp_path)
    net.cloud.calibrate_every_round = False
    for r in (1, 2):
        net.run_round(r)
    for edge in ("edge-0", "edge-1"):
        store = KnowledgeStore(tmp_path / "knowledge" / "edges" / edge)
        assert not (store.folder(1) / ROUTING_NAME).exists() and store.verify(1) is None
        assert (store.folder(2) / ROUTING_NAME).is_file() and store.verify(2) is None


def test_published_edge_version_carries_its_routing(run_dir):
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.knowledge.accounting import content_hash
    from gaisnet_ray.knowledge.store import KnowledgeStore

    run = ServedRun(run_dir)
    for edge in ("edge-0", "edge-1"):
        store = KnowledgeStore(run_dir / "knowledge" / "edges" / edge)
        folder, lineage = store.folder(1), store.lineage(1)
        data = (folder / ROUTING_NAME).read_bytes()
        table = RoutingTable.from_json(data.decode())
        assert (table.adapter, table.version, table.cloud) == (edge, 1, {"adapter": "global", "version": 1})
        assert table.content_hash == lineage["content_hash"] == content_hash(store.load(1))
        assert set(table.domains) == {"arithmetic", "strings", "units", "facts"}
        for cal in table.domains.values():
            assert cal.samples == 4 and 0 <= cal.kept <= 4 and cal.tiered_em >= cal.cloud_em
        assert set(lineage["files_sha256"]) == {ROUTING_NAME} and store.verify(1) is None
        assert run.routing_table(edge, 1) == table
    assert run.routing_table("global", 1) is None  # the cloud's own adapter: nothing to escalate to
    # the routing file is covered like the weights: an edited one makes the version damaged
    copy = run_dir.parent / "edited"
    shutil.copytree(run_dir, copy)
    path = copy / "knowledge" / "edges" / "edge-0" / "v0001" / ROUTING_NAME
    path.write_text(path.read_text().replace('"kept": ', '"kept": 1'))
    assert "routing.json does not match its lineage's files_sha256" in KnowledgeStore(path.parent.parent).verify(1)
    assert ServedRun(copy).routing_table("edge-0", 1) is None


def test_calibrated_thresholds_reproduce_on_the_served_signals(run_dir):
    """The batched measurement calibration uses gives the signals the served edge reports
    (``CausalGenerator``, one prompt at a time)."""
    from gaisnet_ray.data import sample_examples
    from gaisnet_ray.inference import CausalGenerator
    from gaisnet_ray.inference.served import ServedRun

    run = ServedRun(run_dir)
    model, _ = run.load_model("edge-0")
    prompts = [e.prompt for e in sample_examples("arithmetic", "eval", 3, 0) + sample_examples("facts", "eval", 3, 0)]
    batched = measure(model, run.tokenizer, prompts, 8, run.system_prompt)
    served = CausalGenerator(model, run.tokenizer, 64, 64, run.system_prompt)
    for p, m in zip(prompts, batched):
        g = served.generate(p, max_new_tokens=8)
        assert m.text == g.text
        assert m.min_token_prob == pytest.approx(g.min_token_prob, rel=1e-3, abs=1e-6)
        assert m.mean_entropy == pytest.approx(g.mean_entropy, rel=1e-3, abs=1e-5)


def test_a_run_without_calibration_gets_a_sidecar_bound_to_its_weights(run_dir, tmp_path):
    from gaisnet_ray.inference.served import ServedRun

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for edge in ("edge-0", "edge-1"):  # as a run made before calibration: no routing.json in v1
        folder = copy / "knowledge" / "edges" / edge / "v0001"
        (folder / ROUTING_NAME).unlink()
        lineage = json.loads((folder / "lineage.json").read_text())
        del lineage["files_sha256"]
        (folder / "lineage.json").write_text(json.dumps(lineage))
    assert ServedRun(copy).routing_table("edge-0", 1) is None
    written = calibrate_run(copy)
    assert written == [sidecar_path(copy, "edge-0", 1), sidecar_path(copy, "edge-1", 1)]
    run = ServedRun(copy)
    table = run.routing_table("edge-0", 1)
    # the same measurement as at publish time: the same thresholds
    assert table.domains == ServedRun(run_dir).routing_table("edge-0", 1).domains
    # a sidecar measured on other weights is ignored
    side = sidecar_path(copy, "edge-1", 1)
    side.write_text(json.dumps({**json.loads(side.read_text()), "content_hash": "0" * 64}))
    assert ServedRun(copy).routing_table("edge-1", 1) is None


# ----------------------------------------------------------------- the router uses them
def test_router_decides_with_the_answering_versions_thresholds(run_dir):
    """``TierRouter._policy`` is what the router's cascade judges the edge's probe with (the version
    the probe ran on, the prompt's domain); no Ray: the handles are never called here."""
    from gaisnet_ray.inference.generate import Confidence
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.router import TierRouter

    run = ServedRun(run_dir)
    domain = "arithmetic"
    adapter = run.domain_adapters()[domain]
    cal = run.routing_table(adapter, 1).domains[domain]
    assert cal.signal == "min_token_prob" and cal.threshold is not None  # tiny: both tiers equally wrong
    # fixed limits that keep everything: only the calibrated rule can escalate
    router = TierRouter(None, None, None, str(run_dir), {"routing": {"max_mean_entropy": 100.0, "min_token_prob": 0.0}},
                        metrics=object())
    policy = router._policy(adapter, 1, domain)
    assert policy.rule == CalibratedRule("min_token_prob", cal.threshold, f"{adapter} v0001, domain '{domain}'")
    kept = route_after_edge(Confidence(8, 0.1, cal.threshold), policy)
    assert kept.tier == "edge" and f"calibrated {cal.threshold:.3f} ({adapter} v0001, domain '{domain}')" in kept.reason
    up = route_after_edge(Confidence(8, 0.1, cal.threshold * 0.99), policy)
    assert (up.tier, up.escalated) == ("cloud", True)
    # a version without a table, the global adapter, no domain -> the fixed limits (keep)
    for fixed in (router._policy(adapter, 2, domain), router._policy("global", 1, domain),
                  router._policy(adapter, 1, None)):
        assert fixed is router.policy and route_after_edge(Confidence(8, 0.1, 1e-6), fixed).tier == "edge"


def test_store_publishes_extra_files_covered_by_the_lineage(tmp_path):
    import hashlib

    import torch
    from peft import LoraConfig

    from gaisnet_ray.knowledge.errors import KnowledgeError
    from gaisnet_ray.knowledge.store import KnowledgeStore

    store = KnowledgeStore(tmp_path / "k")
    state = {"a.lora_B.weight": torch.ones(2, 2)}
    config = LoraConfig(r=2, target_modules=["a"])
    store.publish(0, state, config, {"round": 0}, files={ROUTING_NAME: b'{"x": 1}\n'})
    assert store.lineage(0)["files_sha256"] == {ROUTING_NAME: hashlib.sha256(b'{"x": 1}\n').hexdigest()}
    assert (store.folder(0) / ROUTING_NAME).read_bytes() == b'{"x": 1}\n' and store.verify(0) is None
    (store.folder(0) / ROUTING_NAME).unlink()
    assert store.verify(0) == f"v0000: {ROUTING_NAME} is missing"
    store.publish(1, state, config, {"round": 1})  # no files: no files_sha256, as before
    assert "files_sha256" not in store.lineage(1) and store.verify(1) is None
    for bad in ("adapter_model.safetensors", "../x.json", ".hidden"):
        with pytest.raises(KnowledgeError, match="must be plain names"):
            store.publish(2, state, config, {"round": 2}, files={bad: b"x"})
    with pytest.raises(KnowledgeError, match="reserved"):
        store.publish(2, state, config, {"files_sha256": {}})
