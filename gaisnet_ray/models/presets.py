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


def preset_fields(family: str, preset: str, vocab_size: int, max_positions: int, specials: dict) -> dict:
    """The arguments of the preset's transformers config class (``GPT2Config`` / ``LlamaConfig``):
    what ``preset_config`` builds from, and what the driver reads the model's shape from without
    importing transformers (``preset_config_dict``). ``specials``: bos/eos/pad token ids."""
    from .cuts import UnknownModelFamilyError

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset '{preset}'; known: {sorted(PRESETS)}")
    layers, hidden, heads, kv_heads, mlp = PRESETS[preset]
    if family == "gpt2":
        return dict(vocab_size=vocab_size, n_positions=max_positions, n_embd=hidden, n_layer=layers,
                    n_head=heads, n_inner=mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **specials)
    if family == "llama":
        return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    max_position_embeddings=max_positions, tie_word_embeddings=False, **specials)
    raise UnknownModelFamilyError(family)


def preset_config(family: str, preset: str, vocab_size: int, max_positions: int, tokenizer) -> PretrainedConfig:
    from transformers import GPT2Config, LlamaConfig

    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    fields = preset_fields(family, preset, vocab_size, max_positions, specials)
    return (GPT2Config if family == "gpt2" else LlamaConfig)(**fields)


def preset_config_dict(family: str, preset: str, max_positions: int) -> dict:
    """The preset's config as the keys its config class is given, plus ``model_type``, for the byte
    tokenizer the presets use: the block count and the sizes the memory estimate and the planner read
    (``models.geometry``), without importing transformers or torch. A key the class would fill with
    its default is absent; ``ModelGeometry.from_config`` applies the same defaults (tested against
    ``preset_config(...).to_dict()``)."""
    from .tokenizer import byte_special_ids, byte_vocab

    return {"model_type": family,
            **preset_fields(family, preset, len(byte_vocab()), max_positions, byte_special_ids())}
