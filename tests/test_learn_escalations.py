"""serve.learn_from_escalations: the edge's bounded store of escalations, the distillation into its
adapter, and the fold into the edge's aggregation; one Serve test of the whole loop.

The Ray-free tests use the tiny run folder the serving tests share (``servecheck.make_run``: one
in-process round, no Ray)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gaisnet_ray.config import LearnSettings, ServeSettings
from gaisnet_ray.inference.learn import (
    LEARNED_META_NAME,
    LEARNED_WEIGHTS_NAME,
    AnswerPair,
    answer_loss,
    answer_rows,
    distil,
    escalation_weight,
    fold_delta,
    load_learned,
    save_learned,
)
from gaisnet_ray.serve.escalations import (
    STORE_NAME,
    EscalationLearner,
    EscalationRecord,
    EscalationStore,
    escalation_record,
    store_folder,
)
from servecheck import make_run, wait_for

# what the cloud "answered": short texts the tiny model does not say on its own
PAIRS = [AnswerPair("12+7=", "19"), AnswerPair("rev abc=", "cba"), AnswerPair("3 m in cm=", "300"),
         AnswerPair("cap France=", "Paris")]


def _rec(prompt: str, answer: str = "a", at: float = 1000.0, edge: str = "edge-0") -> EscalationRecord:
    return EscalationRecord(prompt, answer, True, edge, "arithmetic", 1, 1, at)


# ------------------------------------------------------------------------------------ the store
def test_store_keeps_the_newest_per_prompt_within_its_bounds(tmp_path):
    clock = SimpleNamespace(now=1000.0)
    learn = LearnSettings(max_records=3, max_chars=10, retention_s=100)
    store = EscalationStore(store_folder(tmp_path, learn, "edge-0"), learn, clock=lambda: clock.now)
    for i in range(5):  # p0..p4: only the newest three stay
        assert store.add(_rec(f"p{i}", at=clock.now + i))
    assert [r.prompt for r in store.records()] == ["p2", "p3", "p4"]
    store.add(_rec("p3", "new", at=1010.0))  # the same prompt again: its newest answer, moved to the end
    assert [(r.prompt, r.answer) for r in store.records()] == [("p2", "a"), ("p4", "a"), ("p3", "new")]
    assert not store.add(_rec("x" * 11))  # longer than max_chars: not kept
    assert not store.add(_rec("p", "y" * 11))
    assert store.refused == 2 and store.added == 6
    clock.now = 1104.5  # retention 100 s: p2 (1002) and p4 (1004) are past it, p3 (1010) is not
    assert [r.prompt for r in store.records()] == ["p3"]
    assert len(store) == 1
    # on disk: under the edge's private area (never knowledge/), owner-only, compacted to the bounds
    assert store.path == tmp_path / "edges_private" / "edge-0" / STORE_NAME
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    assert len(store.path.read_text().splitlines()) == 1
    assert not (tmp_path / "knowledge").exists()


def test_store_file_stays_bounded_while_appending(tmp_path):
    learn = LearnSettings(max_records=4)
    store = EscalationStore(tmp_path / "e", learn)
    for i in range(50):
        store.add(_rec(f"p{i}", at=0))  # at=0: stamped with the store's clock
        assert len(store.path.read_text().splitlines()) <= 2 * learn.max_records
    assert [r.prompt for r in store.records()] == ["p46", "p47", "p48", "p49"]
    assert EscalationStore(tmp_path / "e", learn).records() == store.records()  # another replica reads the same


def test_store_folder_is_the_edges_own(tmp_path):
    assert store_folder(tmp_path, LearnSettings(store_dir=str(tmp_path / "local")), "edge-1") == \
        tmp_path / "local" / "edge-1"
    for bad in ["../x", "", ".hidden", "a/b"]:
        with pytest.raises(ValueError, match="not an edge name"):
            store_folder(tmp_path, LearnSettings(), bad)


def test_only_an_edge_adapters_escalation_to_the_cloud_is_kept():
    gen = SimpleNamespace(text="19")
    req = SimpleNamespace(prompt="12+7=", chat=True)
    edge = SimpleNamespace(adapter="edge-1", version=3)
    cloud = SimpleNamespace(tier="cloud", version=4, generation=gen)
    r = escalation_record(req, "arithmetic", edge, cloud)
    assert (r.prompt, r.answer, r.edge, r.edge_version, r.cloud_version, r.domain) == \
        ("12+7=", "19", "edge-1", 3, 4, "arithmetic")
    assert escalation_record(req, None, SimpleNamespace(adapter="global", version=3), cloud) is None
    assert escalation_record(req, None, edge, SimpleNamespace(tier="edge", version=4, generation=gen)) is None
    assert escalation_record(req, None, edge, SimpleNamespace(tier="cloud", version=4,
                                                              generation=SimpleNamespace(text="  "))) is None
    assert escalation_record(req, None, None, cloud) is None


# ------------------------------------------------------------------------------- the arithmetic
def test_escalation_weight_is_capped_at_its_share():
    assert escalation_weight(10, 90, 0.25) == 10  # 10 <= 0.25 * 90 / 0.75 = 30
    assert escalation_weight(100, 90, 0.25) == 30  # capped: 30 / (90 + 30) = 0.25
    assert escalation_weight(100, 90, 0.0) == 0 and escalation_weight(0, 90, 0.25) == 0


def test_fold_delta_adds_to_the_rounds_start():
    start = {"a.lora_A.weight": torch.ones(2, 2), "a.lora_B.weight": torch.zeros(2, 2)}
    out = fold_delta(start, {"a.lora_B.weight": torch.full((2, 2), 0.5)})
    assert torch.equal(out["a.lora_B.weight"], torch.full((2, 2), 0.5))
    assert out["a.lora_A.weight"] is start["a.lora_A.weight"]
    with pytest.raises(KeyError, match="does not hold"):
        fold_delta(start, {"b.lora_B.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        fold_delta(start, {"a.lora_B.weight": torch.zeros(3, 2)})


def test_learned_delta_round_trips_and_a_half_written_one_is_ignored(tmp_path):
    delta = {"x.lora_B.weight": torch.arange(4.0).reshape(2, 2)}
    save_learned(tmp_path, delta, {"records": 3})
    got, meta = load_learned(tmp_path)
    assert torch.equal(got["x.lora_B.weight"], delta["x.lora_B.weight"]) and meta == {"records": 3}
    assert stat.S_IMODE((tmp_path / LEARNED_WEIGHTS_NAME).stat().st_mode) == 0o600
    (tmp_path / LEARNED_META_NAME).write_text("{not json")
    assert load_learned(tmp_path) is None and load_learned(None) is None


# ----------------------------------------------------------------------- distillation (tiny model)
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("learn") / "run")


def test_answer_rows_supervise_only_the_answer_and_eos(run_dir):
    from gaisnet_ray.inference.generate import prompt_ids
    from gaisnet_ray.inference.served import ServedRun

    tok = ServedRun(run_dir).tokenizer
    rows = answer_rows(PAIRS[:2], tok)
    p = prompt_ids("12+7=", tok)
    answer = tok.encode("19", add_special_tokens=False) + [tok.eos_token_id]
    assert rows["input_ids"][0, :len(p)].tolist() == p
    assert rows["labels"][0].tolist()[:len(p) + len(answer)] == [-100] * len(p) + answer
    assert rows["attention_mask"][0].sum() == len(p) + len(answer)
    assert (rows["labels"][0, len(p) + len(answer):] == -100).all()


def test_distil_lowers_the_edges_loss_on_the_clouds_answers(run_dir):
    from gaisnet_ray.inference.served import ServedRun

    run = ServedRun(run_dir)
    model, _ = run.load_model("edge-0")
    b_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    a_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k}
    result = distil(model, run.tokenizer, PAIRS, steps=40, batch_size=4, lr=0.01, seed=0)
    assert result.records == 4 and result.steps == 40 and len(result.losses) == 40
    assert result.loss_after < 0.9 * result.loss_before, (result.loss_before, result.loss_after)
    assert result.loss_after == pytest.approx(answer_loss(model, answer_rows(PAIRS, run.tokenizer)))
    # only LoRA B moved, and the delta is exactly what moved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in a_before.items())
    assert set(result.delta) and all("lora_B" in k for k in result.delta)
    moved = sum(float((model.state_dict()[k] - v).abs().sum()) for k, v in b_before.items())
    assert moved > 0 and sum(float(d.abs().sum()) for d in result.delta.values()) == pytest.approx(moved, rel=1e-5)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_learner_serves_the_distilled_adapter_and_writes_the_delta(run_dir, tmp_path):
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.slots import load_served

    run = ServedRun(run_dir)
    settings = ServeSettings(learn_from_escalations=True,
                             learn={"min_records": 4, "steps": 100, "lr": 0.01, "store_dir": str(tmp_path)})
    learner = EscalationLearner(run_dir, settings, run.tokenizer, run.system_prompt)
    served = load_served(run, "edge-0", None, max_prompt_tokens=None)
    slot = SimpleNamespace(adapter="edge-0", current=served)
    for p in PAIRS[:3]:
        assert learner.record(_rec(p.prompt, p.answer, at=0))
    assert not learner.due("edge-0", served)  # 3 < min_records
    learner.record(_rec(PAIRS[3].prompt, PAIRS[3].answer, at=0))
    assert learner.due("edge-0", served)
    state = learner.learn_into("edge-0", slot)
    assert slot.current is not served and slot.current.version == served.version and state["served"]
    assert state["loss_after"] < 0.9 * state["loss_before"] and state["records"] == 4
    for p in PAIRS:  # the learned edge adapter says what the cloud said
        assert slot.current.generator.generate(p.prompt, max_new_tokens=6).text == p.answer
    assert not learner.due("edge-0", slot.current)  # learned into it already
    assert learner.due("edge-0", served)  # a reloaded (or newer) model is due again
    delta, meta = load_learned(tmp_path / "edge-0")
    assert meta["records"] == 4 and meta["knowledge_version"] == served.version
    assert set(delta) == {k for k in delta if "lora_B" in k} and delta
    info = learner.info()["edge-0"]
    assert info["records"] == 4 and info["last"]["distillations"] == 1
    assert "12+7=" not in json.dumps(info)  # counts only, never the prompts


def test_anchors_are_kept_apart_and_distilled_beside_the_escalations(run_dir, tmp_path):
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.escalations import ANCHOR_NAME, kept_record
    from gaisnet_ray.serve.slots import load_served

    run = ServedRun(run_dir)
    settings = ServeSettings(learn_from_escalations=True, learn={"min_records": 1, "steps": 60, "lr": 0.01,
                                                                 "anchors": True, "store_dir": str(tmp_path)})
    learner = EscalationLearner(run_dir, settings, run.tokenizer, run.system_prompt)
    req = SimpleNamespace(prompt="rev abc=", chat=True)
    kept = kept_record(req, "strings", SimpleNamespace(tier="edge", adapter="edge-0", version=1,
                                                       generation=SimpleNamespace(text="cba")))
    assert kept.source == "edge" and kept_record(req, None, SimpleNamespace(
        tier="edge", adapter="global", version=1, generation=SimpleNamespace(text="cba"))) is None
    served = load_served(run, "edge-0", None, max_prompt_tokens=None)
    assert learner.record(kept) and not learner.due("edge-0", served)  # an anchor alone makes nothing due
    assert (tmp_path / "edge-0" / ANCHOR_NAME).is_file() and not (tmp_path / "edge-0" / STORE_NAME).exists()
    learner.record(_rec("12+7=", "19", at=0))
    slot = SimpleNamespace(adapter="edge-0", current=served)
    state = learner.learn_into("edge-0", slot)
    assert (state["records"], state["anchors"]) == (1, 1)  # the fold weighs escalations only
    for prompt, answer in (("12+7=", "19"), ("rev abc=", "cba")):
        assert slot.current.generator.generate(prompt, max_new_tokens=6).text == answer
    assert learner.info()["edge-0"]["anchors"] == 1


def test_a_round_folds_the_learned_delta_into_the_edges_aggregation(tmp_path):
    """Two in-process rounds, learning off and on, same seeds, a delta written in edge-0's area: the
    edge's adapter with learning is the FedAvg of its clusters' result (weight W, its samples) and
    round start + delta (weight min(records, W * 0.5 / 0.5) = W): (off + start + delta) / 2."""
    from conftest import small_job
    from gaisnet_ray.config import config_to_yaml, load_config
    from gaisnet_ray.inference.learn import edge_area
    from gaisnet_ray.inprocess import InProcessGaisNet
    from gaisnet_ray.knowledge.store import KnowledgeStore
    from tinycfg import TINY_YAML

    got = {}
    for learn in ("false", "true"):
        out = tmp_path / learn
        out.mkdir()
        cfg = load_config(TINY_YAML, small_job(f"serve.learn_from_escalations={learn}", "serve.learn.max_share=0.5",
                                               "relay.policy=none"))
        (out / "config.yaml").write_text(config_to_yaml(cfg))
        gais = InProcessGaisNet(cfg, out)
        start = KnowledgeStore(out / "knowledge").load(0)
        delta = {k: torch.full_like(v, 0.25) for k, v in start.items() if "lora_B" in k}
        save_learned(edge_area(out, None, "edge-0"), delta, {"records": 1000, "knowledge_version": 0})
        metrics = gais.run_round(1)
        got[learn] = (KnowledgeStore(out / "knowledge" / "edges" / "edge-0").load(1), metrics)
    (off, m_off), (on, m_on) = got["false"], got["true"]
    assert "escalations_learned" not in m_off  # off: the delta on disk is never read
    folded = m_on["escalations_learned"]
    assert set(folded) == {"edge-0"} and folded["edge-0"]["records"] == 1000
    samples = KnowledgeStore(tmp_path / "true" / "knowledge" / "edges" / "edge-0").lineage(1)["num_samples"]
    assert folded["edge-0"]["weight"] == samples > 0  # capped at 50%: as much as the edge's samples this round
    for k, v in on.items():
        want = (off[k] + start[k] + delta[k]) / 2 if k in delta else (off[k] + start[k]) / 2
        assert torch.allclose(v, want, atol=1e-6), k


# ----------------------------------------------------------------------------- on Ray Serve
def test_serve_loop_escalations_come_back_and_the_edge_learns_them(ray_local, run_dir):
    """Every answer escalates (entropy limit 0); the router hands each cloud answer back to the edge
    that escalated (plain and streamed); the edge replica keeps them on its area, distils them on its
    poll tick, and its pinned adapter then says what the cloud said."""
    import httpx

    from conftest import free_port
    from gaisnet_ray.inference.served import ServedRun
    from gaisnet_ray.serve.app import start_serving

    domain, adapter = next((d, a) for d, a in ServedRun(run_dir).domain_adapters().items())
    settings = ServeSettings(port=free_port(), max_new_tokens=16, default_new_tokens=6, poll_interval_s=0.5,
                             routing={"max_mean_entropy": 0.0}, learn_from_escalations=True,
                             learn={"min_records": 5, "steps": 100, "lr": 0.01})
    handle = start_serving(run_dir, settings)
    prompts = [p.prompt for p in PAIRS]
    try:
        with httpx.Client(base_url=handle.url, timeout=120) as http:
            cloud = {}
            before = {p: http.post("/v1/generate", json={"prompt": p, "adapter": adapter}).json()["text"]
                      for p in prompts}  # the pinned edge adapter before it learns (no escalation on a pin)
            for p in prompts:
                g = http.post("/v1/generate", json={"prompt": p, "domain": domain}).json()
                assert g["tier"] == "cloud" and g["escalated"] and g["edge_attempt"]["adapter"] == adapter, g
                cloud[p] = http.post("/v1/generate", json={"prompt": p, "tier": "cloud"}).json()["text"]
            # streamed too: a raw completion prompt is its own record (chat false), same tokens on this tokenizer
            with http.stream("POST", "/v1/completions", json={
                    "model": f"gaisnet:{domain}", "stream": True, "max_tokens": 6, "prompt": prompts[0]}) as r:
                body = r.read().decode()
                assert r.status_code == 200 and '"escalated":true' in body and "[DONE]" in body, body

            def learning() -> dict:
                return (http.get("/health").json()["tiers"]["edge"].get("learning") or {}).get(adapter) or {}

            wait_for(lambda: (learning().get("last") or {}).get("records") == 5, 90, "the edge to distil 5 records")
            last = learning()["last"]
            assert last["served"] and last["loss_after"] < last["loss_before"] and last["knowledge_version"] == 1
            after = {}
            for p in prompts:  # the learned weights are what the pinned edge adapter now serves
                edge = http.post("/v1/generate", json={"prompt": p, "adapter": adapter}).json()
                assert edge["tier"] == "edge"
                after[p] = edge["text"]
            # the tiny model's texts are noise, so exact agreement is not promised here (the Ray-free tests
            # show the distilled edge saying the cloud's answers); the served answers changed, and not away
            assert after != before, (before, after)
            agree = lambda answers: sum(answers[p] == cloud[p] for p in prompts)  # noqa: E731
            assert agree(after) >= agree(before), (before, after, cloud)
    finally:
        handle.shutdown()
    area = run_dir / "edges_private" / adapter
    assert {json.loads(line)["prompt"] for line in (area / STORE_NAME).read_text().splitlines()} >= set(prompts)
    assert (area / LEARNED_WEIGHTS_NAME).is_file()
    assert not list((run_dir / "knowledge").rglob("escalations*"))  # never in what is relayed
