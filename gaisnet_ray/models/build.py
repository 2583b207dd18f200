"""Build or load the foundation causal LM and its tokenizer, and ship it between processes.

Two kinds of source, one code path afterwards: a named preset built from config (offline, seeded),
or a local Hugging Face folder holding any GPT-2 or Llama-family causal LM — ``model.path`` or the
real ``smollm2-135m`` preset, resolved (GGUF converted and cached, Hub id fetched) by ``sources``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..config import ModelConfig
from .cuts import SUPPORTED_FAMILIES, UnknownModelFamilyError
from .presets import preset_config
from .sources import quiet_transformers, resolve_model_dir
from .tokenizer import build_byte_tokenizer

if TYPE_CHECKING:
    from .parts import ModelPart

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
    """The foundation model and tokenizer named by ``cfg`` (a preset, or ``cfg.path``).

    Seeds torch with ``cfg.seed`` first, also for loaded weights: what draws random numbers next (a
    preset's initialisation, then the LoRA matrices ``attach_lora`` initialises) must not depend on
    what the process did before (a Ray actor starts fresh, an in-process run may have calibrated the
    host first: on SmolLM2 their LoRA A differed, so the two runs' knowledge did too)."""
    torch.manual_seed(cfg.seed)
    folder = resolve_model_dir(cfg)
    if folder is not None:
        return load_foundation(folder, cfg.attn_implementation)
    tokenizer = build_byte_tokenizer()
    config = preset_config(cfg.family, cfg.preset, len(tokenizer), max(cfg.max_seq_len, 64), tokenizer)
    config._attn_implementation = cfg.attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    return _ready(model), tokenizer


def load_foundation(path: str | Path, attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, object]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path '{path}' is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnknownModelFamilyError(config.model_type)
    # float32 whatever the folder stores (a Hub bf16 copy and a dequantized GGUF load the same)
    with quiet_transformers(errors_only=False):  # no "Loading weights" bar; warnings still show
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation,
                                                     dtype=torch.float32)
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
    with quiet_transformers(errors_only=False):  # no "Writing model shards" bar
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclass
class FoundationPackage:
    """The frozen foundation model as it travels down from the cloud: config, weights, tokenizer.

    Weights travel once per base version (Ray object store), so a multi-node cluster needs no shared
    filesystem. Tied weights are one tensor under both names and are re-tied on materialize.

    A package holds the whole model or a part of it (``holds``, a ``models.parts.ModelPart``):
    ``part``/``cut`` give a package of some modules only (the same tensors, nothing copied), and
    ``materialize`` builds only what the package holds, so a tier never allocates the rest. Pickled
    (Ray), each distinct tensor travels as one raw byte buffer: the object store hands it to the
    receiver without a copy, read-only; ``materialize`` and ``load_base_state`` copy out of it.
    """

    config: dict
    state_dict: dict[str, torch.Tensor]
    tokenizer: object
    attn_implementation: str = "sdpa"
    holds: "ModelPart | None" = None  # None: the whole model

    @classmethod
    def from_model(cls, model: PreTrainedModel, tokenizer, copy: bool = True) -> "FoundationPackage":
        """The whole model's weights; ``copy=False`` shares the model's own tensors (on the CPU), so the
        package follows every in-place change of the model."""
        from .parts import storage_key

        sd, distinct = {}, {}
        for k, v in model.state_dict().items():
            v = v.detach()
            ident = storage_key(v)
            if ident not in distinct:  # tied weights: one tensor under both names
                distinct[ident] = v.clone() if copy else v.to("cpu")
            sd[k] = distinct[ident]
        return cls(model.config.to_dict(), sd, tokenizer, model.config._attn_implementation)

    # ----------------------------------------------------------------------------------- parts
    @property
    def part_spec(self) -> "ModelPart":
        from .parts import ModelPart

        return self.holds if self.holds is not None else ModelPart.whole()

    @property
    def family(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def num_layers(self) -> int:
        return int(self.config.get("n_layer", self.config.get("num_hidden_layers")))

    def cut(self, spec: "ModelPart") -> "FoundationPackage":
        """A package holding only ``spec`` (its tensors are this package's: nothing is copied)."""
        from .parts import select_state

        if not self.part_spec.covers(spec, self.num_layers):
            raise ValueError(f"cannot cut {spec} out of a package holding {self.part_spec}")
        return FoundationPackage(self.config, select_state(self.family, self.state_dict, spec), self.tokenizer,
                                 self.attn_implementation, None if spec.is_whole else spec)

    def part(self, layers: "set[int] | None" = None, embeddings: bool = True, head: bool = True) -> "FoundationPackage":
        """``cut`` by blocks (None: all), embeddings, and final norm + head."""
        from .parts import ModelPart

        return self.cut(ModelPart.of(layers, embeddings, head))

    def nbytes(self) -> int:
        """Bytes of the weights held (tied weights once)."""
        from .parts import unique_nbytes

        return unique_nbytes(self.state_dict)

    def materialize(self, share_weights: bool = False) -> PreTrainedModel:
        """The causal LM, holding only what this package holds (``models.parts.materialize_part``).
        ``share_weights``: the model takes the package's tensors instead of copies of them."""
        from .parts import materialize_part

        return materialize_part(self, share_weights=share_weights)

    # ------------------------------------------------------------------------------- transport
    def __getstate__(self) -> dict:
        from .parts import tensors_to_buffers

        state = dict(self.__dict__)
        state["state_dict"] = tensors_to_buffers(self.state_dict)
        return state

    def __setstate__(self, state: dict) -> None:
        from .parts import tensors_from_buffers

        state = dict(state)
        state["state_dict"] = tensors_from_buffers(state["state_dict"])
        self.__dict__.update(state)
