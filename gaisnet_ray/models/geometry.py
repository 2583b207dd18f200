"""The sizes that set a causal LM's memory and compute, read from its config dict (no weights loaded).

Parameter counts per block, embedding and head, the bytes of a model part, the LoRA parameters per
block, and the activation memory autograd keeps per token and block: the arithmetic the memory
estimate (``hfsl.memory``) and the round's cost model (``planner.cost``) share. Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cuts import ModelPart

# Autograd keeps per token and block about ACT_H x hidden + ACT_I x intermediate fp32 values under
# LoRA training (the inputs of every projection, norms, attention and MLP intermediates; measured on
# SmolLM2-135M: ~73 kB per token and block; benchmarks/memory_bench.py).
ACT_H = 22
ACT_I = 4


@dataclass(frozen=True)
class ModelGeometry:
    """The sizes that set a causal LM's memory, read from its config dict."""

    family: str
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    positions: int  # learned position embeddings (GPT-2); 0 for rotary
    tied: bool
    bias: bool  # GPT-2's projections have biases

    @classmethod
    def from_config(cls, c: dict) -> "ModelGeometry":
        family = str(c.get("model_type"))
        if family == "gpt2":
            h = int(c["n_embd"])
            heads = int(c["n_head"])
            return cls(family, int(c["n_layer"]), h, int(c.get("n_inner") or 4 * h), int(c["vocab_size"]), heads,
                       heads, h // heads, int(c.get("n_positions", 0)), bool(c.get("tie_word_embeddings", True)), True)
        h = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        return cls(family, int(c["num_hidden_layers"]), h, int(c["intermediate_size"]), int(c["vocab_size"]), heads,
                   int(c.get("num_key_value_heads") or heads), int(c.get("head_dim") or h // heads), 0,
                   bool(c.get("tie_word_embeddings", False)), bool(c.get("attention_bias", False)))

    # parameters ------------------------------------------------------------------------------
    def block_params(self) -> int:
        h, i = self.hidden, self.intermediate
        if self.family == "gpt2":
            return 4 * h * h + 2 * h * i + 9 * h + i  # c_attn, c_proj, c_fc, mlp c_proj (+ biases), 2 norms
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.bias else 0)
        return attn + 3 * h * i + 2 * h

    def embedding_params(self) -> int:
        return (self.vocab + self.positions) * self.hidden

    def head_params(self) -> int:
        norm = 2 * self.hidden if self.family == "gpt2" else self.hidden
        return norm + (0 if self.tied else self.vocab * self.hidden)

    def part_bytes(self, part: "ModelPart", bytes_per_param: int = 4) -> int:
        n = len(part.held_layers(self.num_layers)) * self.block_params()
        n += self.embedding_params() if part.embeddings else 0
        if part.head:
            n += self.head_params() + (self.vocab * self.hidden if self.tied and not part.embeddings else 0)
        return n * bytes_per_param

    def lora_params_per_block(self, r: int, targets: list[str] | None) -> int:
        h, i = self.hidden, self.intermediate
        if self.family == "gpt2":
            shapes = {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (i, h)], "c_fc": [(h, i)]}
            default = ["c_attn", "c_proj", "c_fc"]
        else:
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            shapes = {"q_proj": [(h, q)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(q, h)],
                      "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)]}
            default = list(shapes)
        # a target this table does not know is counted as one hidden x hidden projection
        return sum(r * (a + b) for t in (targets or default) for a, b in shapes.get(t, [(h, h)]))

    def activation_bytes_per_token_block(self, attn_eager: bool, seq_len: int) -> int:
        floats = ACT_H * self.hidden + ACT_I * self.intermediate + (2 * self.heads * seq_len if attn_eager else 0)
        return 4 * floats
