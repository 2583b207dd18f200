"""Tests for the adapter store (gaisnet_ray.knowledge.store): publish, lineage, loading with plain
peft, integrity checks. The shared versioned-store behaviour: test_versioned_store.py. No Ray.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from gaisnet_ray.knowledge import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    HISTORY_NAME,
    LINEAGE_NAME,
    KnowledgeError,
    KnowledgeStore,
    NonFiniteUpdateError,
    content_hash,
)



def _lora_config(targets: list[str], fan_in_fan_out: bool, base_model_name_or_path: str | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name_or_path,
    )


def test_store_round_trip_lineage_and_republish(tmp_path):
    store = KnowledgeStore(tmp_path / "knowledge")
    assert store.versions() == [] and store.latest_version() is None and store.history() == []
    config = _lora_config(["c_attn"], fan_in_fan_out=True, base_model_name_or_path="tiny-test-base")
    v0 = {
        "base_model.model.h.0.lora_A.weight": torch.randn(4, 8),
        "base_model.model.h.0.lora_B.weight": torch.randn(8, 4),
    }
    v1 = {k: t * 2 for k, t in v0.items()}

    folder = store.publish(0, v0, config, {"round": 0, "sources": ["edge-0"]})
    store.publish(1, v1, config, {"round": 1, "sources": ["edge-0", "edge-1"]})

    assert folder == store.path(0) == tmp_path / "knowledge" / "v0000"
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LINEAGE_NAME])
    assert store.versions() == [0, 1] and store.latest_version() == 1
    loaded = store.load(0)
    assert loaded.keys() == v0.keys() and all(torch.equal(loaded[k], v0[k]) for k in v0)

    record = store.lineage(1)
    assert record["round"] == 1 and record["sources"] == ["edge-0", "edge-1"] and record["version"] == 1
    assert record["content_hash"] == content_hash(v1) == content_hash(store.load(1))
    assert record["num_tensors"] == 2 and record["nbytes"] == 2 * 32 * 4
    assert "created_at" in record
    lines = (tmp_path / "knowledge" / HISTORY_NAME).read_text().splitlines()
    assert [json.loads(line)["version"] for line in lines] == [0, 1]
    assert store.history() == [store.lineage(0), store.lineage(1)]
    saved_config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    assert saved_config["base_model_name_or_path"] == "tiny-test-base"
    assert config.inference_mode is False  # caller's config untouched

    with pytest.raises(KnowledgeError, match="version 1 already exists"):
        store.publish(1, v0, config, {})
    with pytest.raises(KnowledgeError, match="version 5 not found"):
        store.path(5)
    with pytest.raises(KnowledgeError, match="reserved"):
        store.publish(2, v0, config, {"version": 9})
    with pytest.raises(NonFiniteUpdateError, match="lora_B.*'v0003'"):
        store.publish(3, {**v0, "base_model.model.h.0.lora_B.weight": torch.full((8, 4), math.nan)}, config, {})
    assert store.versions() == [0, 1]
    assert [p.name for p in (tmp_path / "knowledge").iterdir() if p.name.startswith(".tmp")] == []


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    ("build", "targets", "fan_in_fan_out"),
    [
        (_tiny_gpt2, ["c_attn", "c_proj", "c_fc"], True),
        (_tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    ],
    ids=["gpt2", "llama"],
)
def test_published_version_loads_with_plain_peft(tmp_path, build, targets, fan_in_fan_out):
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    base = build().eval()
    fresh_base = copy.deepcopy(base)  # get_peft_model injects LoRA layers into `base` in place
    model = get_peft_model(base, _lora_config(targets, fan_in_fan_out)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft initialises lora_B to zero: make the adapter change the logits
                param.normal_(std=0.5)
    input_ids = torch.randint(0, 300, (2, 10))  # (B, T)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits  # (B, T, vocab)
        base_logits = fresh_base(input_ids=input_ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)

    store = KnowledgeStore(tmp_path)
    store.publish(0, get_peft_model_state_dict(model), model.peft_config["default"], {"round": 0})
    loaded = PeftModel.from_pretrained(fresh_base, store.path(0)).eval()
    with torch.no_grad():
        got = loaded(input_ids=input_ids).logits
    assert torch.equal(got, expected)


def test_store_verify_catches_truncated_and_edited_versions_and_finds_newest_intact(tmp_path):
    store = KnowledgeStore(tmp_path / "knowledge")
    config = _lora_config(["c_attn"], fan_in_fan_out=True)
    for v in range(3):
        store.publish(v, {"base_model.model.h.0.attn.c_attn.lora_B.weight": torch.full((4, 2), float(v))}, config, {})
    assert store.latest_intact() == (2, {}) and store.damaged() == {}

    newest = store.path(2) / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut to half, as a crash would
    edited = store.path(1) / "adapter_model.safetensors"
    raw = bytearray(edited.read_bytes())
    raw[-1] ^= 0x01  # one flipped bit in a tensor: the file still parses, the hash does not match
    edited.write_bytes(bytes(raw))

    version, skipped = store.latest_intact()
    assert version == 0
    assert sorted(skipped) == [1, 2]
    assert "v0002" in skipped[2] and "cannot be read" in skipped[2]
    assert "content_hash" in skipped[1]
    assert set(store.damaged()) == {1, 2}
    assert store.latest_intact(up_to=0) == (0, {})
    (store.path(0) / "adapter_config.json").unlink()
    assert store.latest_intact() == (None, {**skipped, 0: "v0000: adapter_config.json is missing"})
    # a version folder whose lineage.json is gone is no published version, but it is damaged
    (store.path(2) / "lineage.json").unlink()
    assert store.versions() == [0, 1]
    assert store.damaged()[2] == "v0002: lineage.json is missing" and set(store.damaged()) == {0, 1, 2}
