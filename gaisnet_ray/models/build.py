"""Build or load the foundation causal LM and its tokenizer, and ship it between processes.

Two sources, one code path afterwards: a named preset built from config (offline, seeded), or a
local Hugging Face folder (``model.path``) holding any GPT-2 or Llama-family causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..config import ModelConfig
from .presets import preset_config
from .tokenizer import build_byte_tokenizer

SUPPORTED_FAMILIES = ("gpt2", "llama")


class UnknownModelFamilyError(ValueError):
    """The model's architecture family has no splitter (see gaisnet_ray.models.split)."""

    def __init__(self, family: str):
        super().__init__(
            f"unknown model family '{family}': supported families are {list(SUPPORTED_FAMILIES)}"
        )
        self.family = family

    def __reduce__(self):
        return (type(self), (self.family,))


def family_of(model: PreTrainedModel) -> str:
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnknownModelFamilyError(str(family))
    return family


def _ready(model: PreTrainedModel) -> PreTrainedModel:
    model.loss_type = "ForCausalLM"  # every supported family is a causal LM (silences a guess)
    model.eval()
    return model


def build_foundation(cfg: ModelConfig) -> tuple[PreTrainedModel, object]:
    """The foundation model and tokenizer named by ``cfg`` (a preset, or ``cfg.path``)."""
    if cfg.path is not None:
        return load_foundation(cfg.path, cfg.attn_implementation)
    tokenizer = build_byte_tokenizer()
    config = preset_config(cfg.family, cfg.preset, len(tokenizer), max(cfg.max_seq_len, 64), tokenizer)
    config._attn_implementation = cfg.attn_implementation
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    return _ready(model), tokenizer


def load_foundation(path: str | Path, attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, object]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path '{path}' is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnknownModelFamilyError(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.eos_token
    return _ready(model), tokenizer


def save_foundation(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> Path:
    """Write a folder that ``AutoModelForCausalLM`` and ``AutoTokenizer.from_pretrained`` load."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclass
class FoundationPackage:
    """The frozen foundation model as it travels down from the cloud: config, weights, tokenizer.

    Weights travel once per base version (Ray object store), so a multi-node cluster needs no shared
    filesystem. Tied weights appear once in the state dict and are re-tied on materialize.
    """

    config: dict
    state_dict: dict[str, torch.Tensor]
    tokenizer: object
    attn_implementation: str = "sdpa"

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer) -> "FoundationPackage":
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(model.config.to_dict(), sd, tokenizer, model.config._attn_implementation)

    def materialize(self) -> PreTrainedModel:
        config = AutoConfig.for_model(**self.config)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=self.attn_implementation)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        # transformers lists tie candidates on the class; they are tied only when the config says so
        tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise ValueError(f"foundation weights do not fit the config: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        return _ready(model)
