"""Each node's core on its own, without Ray: the cloud refuses non-finite and key-mismatched
updates losing nothing, evaluates on its schedule; device and edge trainers called directly (batches,
bytes and messages of a turn, misuse errors); cloud pre-training and evaluation; the message audit.
"""

from __future__ import annotations

import pytest
import torch

from gaisnet_ray.config import load_config
from gaisnet_ray.data import Example, encode_examples
from gaisnet_ray.hfsl.audit import MessageAudit
from gaisnet_ray.hfsl.cloud import CloudCore
from gaisnet_ray.hfsl.evaluate import domain_loss, evaluate_domains
from gaisnet_ray.hfsl.factory import device_trainer, edge_trainer
from gaisnet_ray.inprocess import DirectEdgeLink
from gaisnet_ray.hfsl.messages import EdgeUpdate, LinkUsage
from gaisnet_ray.cloudengine import CloudTrainer
from gaisnet_ray.knowledge import KeyMismatchError, NonFiniteUpdateError
from gaisnet_ray.models.adapters import adapter_state
from gaisnet_ray.models.build import FoundationPackage, build_foundation
from gaisnet_ray.models.split import build_tier_model
from gaisnet_ray.models.cuts import ModelPart, layer_of_key

from conftest import ACT, DEVICE_ADAPTER, FULL_ADAPTER, HFSL_JOB
from tinycfg import TINY_YAML

torch.set_num_threads(1)



# ---------------------------------------------------------------------------------- robustness
@pytest.fixture()
def cloud(tmp_path):
    cfg = load_config(TINY_YAML, [*HFSL_JOB, "data.eval_samples_per_domain=1"])
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
    cfg = load_config(TINY_YAML, [*HFSL_JOB, "data.eval_samples_per_domain=1", "training.eval_every=2"])
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
    cfg = load_config(TINY_YAML, HFSL_JOB)
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
    cfg = load_config(TINY_YAML, [*HFSL_JOB, "training.local_steps=2"])
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
    cfg = load_config(TINY_YAML, [*HFSL_JOB, "training.scheme=fl"])
    assert edge_trainer(cfg, "edge-0", ["end-0-0"], small_package).split is None
    dev = device_trainer(cfg, "end-0-0", small_package)
    assert dev.cut is None and dev.split.held_layers() == {0, 1, 2, 3}


def test_edge_and_device_misuse_errors(small_package):
    cfg = load_config(TINY_YAML, HFSL_JOB)
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
