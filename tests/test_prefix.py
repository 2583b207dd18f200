"""Deep prompts as knowledge (``peft.method: prefix``, models/prefix.py): the split prefix model
computes exactly what peft's monolithic prefix-tuned model computes, an HFSL round with it learns,
its knowledge round-trips through the store and loads in plain peft, and what cannot take a
prefix (relay merge, the KV-cached serving paths) refuses it by name."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from gaisnet_ray.config import ConfigError, PeftConfig, load_config
from gaisnet_ray.inprocess import InProcessGaisNet
from gaisnet_ray.knowledge import KnowledgeStore
from gaisnet_ray.models.adapters import adapter_state, attach_lora, load_adapter_state, merged_base_state
from gaisnet_ray.models.prefix import (PEFT_PREFIX_KEY, PrefixServingError, from_peft_layout, refuse_prefix_serving,
                                       to_peft_layout)
from gaisnet_ray.models.split import build_tier_model
from gaisnet_ray.models.cuts import Cut, edge_part

from conftest import HFSL_JOB
from tinycfg import TINY_YAML, tiny_package

torch.set_num_threads(1)

PREFIX = PeftConfig(method="prefix", num_virtual_tokens=5)


def _monolithic(pkg):
    """peft's own prefix-tuned whole model, with prefixes far from the init (std 0.5)."""
    peft_model = attach_lora(pkg.materialize(), PREFIX, pkg.family)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    return peft_model, weight


def _tiers(pkg, cut: Cut, knowledge):
    """The device (front + back) and edge (middle) tier models of ``cut``, loaded with ``knowledge``."""
    n = pkg.num_layers
    device = build_tier_model(pkg, PREFIX, cut.device_part(n))
    edge = build_tier_model(pkg, PREFIX, edge_part([cut]))
    assert load_adapter_state(device.peft, knowledge) == len(cut.device_layers(n))
    assert load_adapter_state(edge.peft, knowledge) == len(cut.edge_layers())
    return device, edge


@pytest.mark.parametrize("family,front,back", [("gpt2", 1, 1), ("llama", 1, 2)])
def test_split_prefix_equals_peft_prefix_model(family, front, back):
    pkg = tiny_package(family)  # tiny llama: 4 heads, 2 kv heads (GQA: prefixes are per kv head)
    peft_model, weight = _monolithic(pkg)
    n = pkg.num_layers
    knowledge = adapter_state(peft_model)
    kv_dim = 64 if family == "gpt2" else 32  # kv_heads * head_dim: 4 * 16 vs 2 * 16
    assert {k: tuple(v.shape) for k, v in knowledge.items()} == {
        f"prefix.layers.{i}.key_value": (5, 2 * kv_dim) for i in range(n)}  # K then V
    cut = Cut.from_layers(n, front, back)
    device, edge = _tiers(pkg, cut, knowledge)
    # each tier holds (and trains) only the prefixes of the blocks it runs
    assert set(adapter_state(device.peft)) == {f"prefix.layers.{i}.key_value" for i in cut.device_layers(n)}
    assert set(adapter_state(edge.peft)) == {f"prefix.layers.{i}.key_value" for i in cut.edge_layers()}

    ids = torch.randint(3, 200, (3, 13), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    peft_model.train()  # no dropout in the tiny presets: train and eval compute the same
    out = peft_model(input_ids=ids, labels=labels)
    out.loss.backward()

    device.peft.train(), edge.peft.train()
    h_k = device.front(ids, cut.front_end)  # (B, T, H): what the device sends
    x = h_k.detach().requires_grad_()
    y = edge.blocks(x, cut.front_end, cut.back_start)  # the edge's middle
    h_m = y.detach().requires_grad_()
    logits = device.back(h_m, cut.back_start)
    loss = device.loss(logits, labels)
    loss.backward()
    y.backward(h_m.grad)
    h_k.backward(x.grad)

    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    assert abs(float(device.back_loss(h_m.detach(), cut.back_start, labels)) - float(out.loss)) < 1e-5
    grads = from_peft_layout({PEFT_PREFIX_KEY: weight.grad}, n)  # peft's gradient, per block
    tiers = {**device.peft.key_params(), **edge.peft.key_params()}
    assert set(tiers) == set(grads)
    for key, param in tiers.items():
        assert grads[key].abs().max() > 0
        torch.testing.assert_close(param.grad, grads[key], atol=1e-5, rtol=1e-4)


def test_peft_layout_round_trip():
    state = {f"prefix.layers.{i}.key_value": torch.full((2, 3), float(i)) for i in range(3)}
    packed = to_peft_layout(state)
    assert list(packed) == [PEFT_PREFIX_KEY]
    assert packed[PEFT_PREFIX_KEY].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2  # blocks side by side
    assert {k: v.tolist() for k, v in from_peft_layout(packed, 3).items()} == {k: v.tolist() for k, v in state.items()}
    with pytest.raises(ValueError, match="every block"):
        to_peft_layout({k: v for k, v in state.items() if "layers.1." not in k})


# ------------------------------------------------------------------------- a run with prefixes
@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    """2 in-process HFSL rounds with prefix knowledge (relay none), tiny GPT-2."""
    cfg = load_config(TINY_YAML, HFSL_JOB + ["peft.method=prefix", "training.lr=0.03"])
    run_dir = tmp_path_factory.mktemp("prefix")
    net = InProcessGaisNet(cfg, run_dir)
    initial = net.cloud.evaluate()
    metrics = [net.run_round(r) for r in (1, 2)]
    return {"net": net, "dir": run_dir, "initial": initial, "metrics": metrics}


def _mean_loss(ev: dict) -> float:
    return sum(v["loss"] for v in ev.values()) / len(ev)


def test_hfsl_with_prefix_learns(prefix_run):
    m = prefix_run["metrics"]
    assert [x["version"] for x in m] == [1, 2]
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    assert _mean_loss(m[-1]["eval"]) < _mean_loss(prefix_run["initial"]) - 0.1
    knowledge = prefix_run["net"].knowledge
    assert {k: tuple(v.shape) for k, v in knowledge.items()} == {
        f"prefix.layers.{i}.key_value": (8, 128) for i in range(4)}  # 8 virtual tokens, K and V of 4 x 16


def test_prefix_knowledge_round_trips_and_loads_in_plain_peft(prefix_run):
    from peft import PeftModel

    net, run_dir = prefix_run["net"], prefix_run["dir"]
    store = KnowledgeStore(run_dir / "knowledge")
    assert store.versions() == [0, 1, 2]
    loaded = store.load(2)
    assert set(loaded) == set(net.knowledge)
    for k, v in net.knowledge.items():
        assert torch.equal(loaded[k], v)
    folder = store.path(2)
    on_disk = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in on_disk.items()} == {PEFT_PREFIX_KEY: (8, 4 * 128)}  # no model weights
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["num_layers"], config["token_dim"],
            config["prefix_projection"]) == ("PREFIX_TUNING", 8, 4, 64, False)
    assert store.verify(2) is None  # the weights hash to the content_hash their lineage recorded

    base = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    plain = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        cloud = net.cloud.peft(input_ids=ids).logits  # the cloud's model holds version 2
        split = build_tier_model(net.cloud.package, net.cfg.peft)  # the whole model, split path
        load_adapter_state(split.peft, loaded, strict=True)
        got = split.back(split.front(ids, 0), 0)
    torch.testing.assert_close(cloud, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_serving_refuses_prefix_knowledge(prefix_run):
    store = KnowledgeStore(prefix_run["dir"] / "knowledge")
    with pytest.raises(PrefixServingError, match="peft.method prefix"):
        refuse_prefix_serving(store.path(2))
    device = prefix_run["net"].devices["end-0-0"].split
    from transformers import DynamicCache

    with pytest.raises(PrefixServingError, match="KV-cached"):
        device.front(torch.ones(1, 3, dtype=torch.long), 1, cache=DynamicCache(config=device.lm.config))
    with pytest.raises(ValueError, match="cannot be merged"):
        merged_base_state(prefix_run["net"].cloud.peft)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("policy", ["merge", "distill"])
def test_prefix_with_a_relay_is_refused_by_key(policy):
    with pytest.raises(ConfigError, match=rf"peft.method prefix needs relay.policy none \(got '{policy}'\)"):
        load_config(TINY_YAML, ["peft.method=prefix", f"relay.policy={policy}"])
    assert load_config(TINY_YAML, ["relay.policy=merge"]).peft.method == "lora"  # LoRA merges as before
    cfg = load_config(TINY_YAML, ["peft.method=prefix", "relay.policy=none", "peft.num_virtual_tokens=4"])
    assert (cfg.peft.method, cfg.peft.num_virtual_tokens) == ("prefix", 4)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        load_config(TINY_YAML, ["peft.num_virtual_tokens=0"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cloud_generate_keeps_the_prefix(family):
    """peft 0.21's own generate drops the prefix under transformers 5 (it answers as the base);
    the cloud's model generates what greedy decoding with peft's forward gives, left padding too."""
    from transformers import GenerationConfig

    pkg = tiny_package(family)
    model, _ = _monolithic(pkg)
    model.eval()
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1: two pads on the left
    gen = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, 7:]
        for row, start in ((0, 0), (1, 2)):  # greedy with peft's forward on the unpadded prompt
            x = ids[row:row + 1, start:]
            for _ in range(6):
                x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert got[row].tolist() == x[0, 7 - start:].tolist()
        # the first step's scores are peft's forward logits (the prefix is in), not the base's
        scored = GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None,
                                  output_scores=True, return_dict_in_generate=True)
        first = model.generate(input_ids=ids[:1], generation_config=scored)
        assert first.sequences.shape == (1, 8)
        torch.testing.assert_close(first.scores[0], model(input_ids=ids[:1]).logits[:, -1], atol=1e-5, rtol=1e-5)
        bare = pkg.materialize().eval().generate(input_ids=ids[:1], generation_config=scored).scores[0]
        assert (first.scores[0] - bare).abs().max() > 1e-2
        with model.disable_adapter():
            torch.testing.assert_close(model.generate(input_ids=ids[:1], generation_config=scored).scores[0], bare)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fresh_prefix_is_the_base_reading_bos_tokens(family):
    """The fresh knowledge (version 0) is each block's own K/V of n BOS tokens: the prefixed model
    computes exactly the base model with n BOS tokens prepended."""
    pkg = tiny_package(family)
    model = attach_lora(pkg.materialize(), PeftConfig(method="prefix", num_virtual_tokens=4), family).eval()
    base = pkg.materialize().eval()
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(5))
    bos = torch.full((2, 4), base.config.bos_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=torch.cat([bos, ids], 1)).logits[:, 4:],
                                   atol=1e-5, rtol=1e-5)
