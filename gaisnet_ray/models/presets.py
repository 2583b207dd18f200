"""Named small model sizes per architecture family, built from config (no hub access)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers loads only when a config is built: the CLI reads PRESETS before
    from transformers import PretrainedConfig  # anything heavy is imported (precheck.py)

# (layers, hidden, heads, kv_heads, mlp) per preset. Sizes chosen so `tiny` trains on 2 CPU cores
# in seconds per round; `base` is ~10x `tiny` in parameters.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (4, 64, 4, 2, 192),
    "small": (6, 128, 4, 2, 384),
    "base": (8, 256, 8, 4, 768),
}


def preset_config(family: str, preset: str, vocab_size: int, max_positions: int, tokenizer) -> PretrainedConfig:
    from transformers import GPT2Config, LlamaConfig

    from .build import UnknownModelFamilyError

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}'; known: {sorted(PRESETS)}")
    layers, hidden, heads, kv_heads, mlp = PRESETS[preset]
    specials = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
            n_head=heads, n_inner=mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **specials,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions, tie_word_embeddings=False, **specials,
        )
    raise UnknownModelFamilyError(family)
