"""Tests for gaisnet_ray.models: the offline byte tokenizer, building/loading/shipping the foundation
model, and the unknown-family error. Tiny presets only; no Ray.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig

from gaisnet_ray.config import ModelConfig
from gaisnet_ray.models.build import (
    FoundationPackage,
    UnknownModelFamilyError,
    build_foundation,
    family_of,
    load_foundation,
    save_foundation,
)
from gaisnet_ray.models.presets import preset_config
from gaisnet_ray.models.tokenizer import build_byte_tokenizer

torch.set_num_threads(1)

TEXTS = [
    "",
    "plain ascii 123 + 456 = 579",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld, naïve café",
    "日本語のテキスト 世界",
    "emoji 🙂🚀 and ZWJ 👩‍👩‍👧",
    "\x00\x7f control bytes",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def _ids(n: int = 3, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 260, (n, t), generator=g)  # (B, T) byte tokens


# ------------------------------------------------------------------------------------ tokenizer
def test_byte_tokenizer_specials_and_size(tokenizer):
    assert len(tokenizer) == 260  # 4 specials + 256 bytes
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # One token per UTF-8 byte, all in the byte range 4..259.
    assert len(ids) == len(text.encode("utf-8"))
    assert all(4 <= i < 260 for i in ids)
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_special_strings_in_text(tokenizer):
    # Like every Hugging Face tokenizer, the literal text of a special token maps to its id; the
    # text still decodes back exactly.
    text = "<eos> in the text"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 2
    assert len(ids) == 1 + len(" in the text")
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_ascii_ids(tokenizer):
    # Byte-level alphabet sorted: "!" (0x21) is the first symbol -> id 4; "a" is 0x61 -> 4 + 0x40 = 68.
    assert tokenizer.encode("!", add_special_tokens=False) == [4]
    assert tokenizer.encode("a", add_special_tokens=False) == [68]
    assert tokenizer.encode("ab", add_special_tokens=False) == [68, 69]
    assert tokenizer.decode([1, 68, 2, 0], skip_special_tokens=True) == "a"


def test_byte_tokenizer_saves_and_reloads(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == 260
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id, again.unk_token_id) == (0, 1, 2, 3)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert again.encode(text, add_special_tokens=False) == ids
        assert again.decode(ids) == text


# ------------------------------------------------------------------------------------- presets
def test_build_gpt2_tiny_has_hand_computed_size():
    model, tok = build_foundation(ModelConfig(family="gpt2", preset="tiny"))
    assert family_of(model) == "gpt2"
    assert model.config.vocab_size == 260 == len(tok)
    assert model.config.n_layer == 4
    assert model.config.n_positions == 64  # max(max_seq_len=48, 64)
    # wte 260*64 + wpe 64*64 + 4 blocks * (ln_1 128 + c_attn 64*192+192 + c_proj 64*64+64
    #   + ln_2 128 + c_fc 64*192+192 + mlp.c_proj 192*64+64 = 41728) + ln_f 128; lm_head tied to wte.
    assert sum(p.numel() for p in model.parameters()) == 16640 + 4096 + 4 * 41728 + 128 == 187776
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.training


def test_build_llama_tiny_has_hand_computed_size():
    model, _ = build_foundation(ModelConfig(family="llama", preset="tiny", attn_implementation="eager"))
    assert family_of(model) == "llama"
    assert model.config.vocab_size == 260
    assert model.config._attn_implementation == "eager"
    # embed 260*64 + 4 blocks * (q 64*64 + k 64*32 + v 64*32 + o 64*64 + 3 * 64*192 + 2 norms 64 = 49280)
    #   + norm 64 + untied lm_head 260*64.
    assert sum(p.numel() for p in model.parameters()) == 16640 + 4 * 49280 + 64 + 16640 == 230464
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_build_is_seeded():
    a, _ = build_foundation(ModelConfig(seed=3))
    b, _ = build_foundation(ModelConfig(seed=3))
    c, _ = build_foundation(ModelConfig(seed=4))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert not torch.allclose(a(ids).logits, c(ids).logits)


def test_preset_config_rejects_unknowns(tokenizer):
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset_config("gpt2", "huge", 260, 64, tokenizer)
    with pytest.raises(UnknownModelFamilyError, match="'bert'"):
        preset_config("bert", "tiny", 260, 64, tokenizer)


# ----------------------------------------------------------------------------- foundation package
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_foundation_package_round_trip(family):
    model, tok = build_foundation(ModelConfig(family=family, attn_implementation="eager"))
    package = FoundationPackage.from_model(model, tok)
    assert package.attn_implementation == "eager"
    # The package is what travels through the object store: it must pickle.
    package = pickle.loads(pickle.dumps(package))
    again = package.materialize()
    assert again.config._attn_implementation == "eager"
    assert not again.training
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    if family == "gpt2":  # tied lm_head/wte share storage again after materialize
        assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()
    else:
        assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()


def test_foundation_package_is_a_copy():
    model, tok = build_foundation(ModelConfig())
    package = FoundationPackage.from_model(model, tok)
    with torch.no_grad():
        model.transformer.h[0].ln_1.weight.add_(1.0)
    assert torch.equal(package.state_dict["transformer.h.0.ln_1.weight"], torch.ones(64))


def test_materialize_rejects_missing_block_weight():
    model, tok = build_foundation(ModelConfig())
    package = FoundationPackage.from_model(model, tok)
    del package.state_dict["transformer.h.0.ln_1.weight"]
    with pytest.raises(ValueError, match=r"do not fit the config: missing=\['transformer.h.0.ln_1.weight'\]"):
        package.materialize()


def test_materialize_rejects_missing_untied_lm_head():
    # Llama presets do not tie lm_head to the embeddings, so a package without lm_head.weight is
    # incomplete: materialize must refuse it rather than keep a randomly initialised head.
    model, tok = build_foundation(ModelConfig(family="llama"))
    package = FoundationPackage.from_model(model, tok)
    del package.state_dict["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        package.materialize()


# --------------------------------------------------------------------------------- saved folders
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_then_load_through_model_path(family, tmp_path):
    model, tok = build_foundation(ModelConfig(family=family, seed=5))
    folder = save_foundation(model, tok, tmp_path / "model")
    assert (folder / "config.json").is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    loaded, loaded_tok = build_foundation(ModelConfig(path=str(folder), family="gpt2", seed=99))
    assert family_of(loaded) == family
    assert loaded_tok.encode("x=1", add_special_tokens=False) == tok.encode("x=1", add_special_tokens=False)
    assert loaded_tok.pad_token_id == 0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Plain Hugging Face loads it too (the run folder contract).
    plain = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_foundation_needs_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_foundation(tmp_path)


def test_unsupported_family_folder_raises_and_names_it(tmp_path):
    BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(UnknownModelFamilyError) as info:
        build_foundation(ModelConfig(path=str(tmp_path)))
    err = info.value
    assert err.family == "bert"
    assert "unknown model family 'bert'" in str(err)
    assert "['gpt2', 'llama']" in str(err)
    assert isinstance(err, ValueError)
    # Errors cross actor boundaries: they must pickle with their payload.
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is UnknownModelFamilyError
    assert again.family == "bert"
    assert str(again) == str(err)
