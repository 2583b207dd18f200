"""Deep prompts as knowledge: P-Tuning v2 prefix tuning, split per block (``peft.method: prefix``).

Every transformer block gets ``num_virtual_tokens`` trainable key/value vectors that its attention
sees before the real tokens (no projection, so the prefix *is* the parameter). Per block the
knowledge is one tensor::

    prefix.layers.{i}.key_value : (num_virtual_tokens, 2 * kv_heads * head_dim)   K then V, per kv head

so a tier owns the prefixes of the blocks it runs (``parts.layer_of_key`` routes the key like a
LoRA key of block i) and FedAvg averages them like any adapter tensor. Concatenated over the blocks
it is peft's ``PrefixTuningConfig`` layout (``prompt_embeddings``: (num_virtual_tokens,
num_layers * 2 * token_dim), token_dim = kv_heads * head_dim under GQA), which is what the
knowledge store writes (``to_peft_layout``) so a version loads with plain ``PeftModel.from_pretrained``.

Exactly as peft runs a prefix-tuned model: the prefix fills each block's KV cache first
(``DynamicCache``), the real tokens take positions ``num_virtual_tokens..`` and attend causally
to everything before them. ``SplitModel`` does that per segment (``PrefixModel.segment_cache``),
so front + middle + back compute what the monolithic peft model computes.

Two holders of the same knowledge: a tier (a part of the model) holds a ``PrefixModel`` with one
parameter per block it runs; the cloud (the whole model, which evaluates, generates and publishes)
holds a real peft ``PeftModelForCausalLM`` with a ``PrefixTuningConfig`` (``attach_peft_prefix``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

PREFIX_KEY = "prefix.layers.{}.key_value"
PEFT_PREFIX_KEY = "prompt_embeddings"  # what peft's get_peft_model_state_dict names a prefix adapter
_PREFIX_KEY_RE = re.compile(r"^prefix\.layers\.(\d+)\.key_value$")
INIT_STD = 0.02  # the fresh prefix of a model without a BOS id: small random keys and values


class PrefixServingError(RuntimeError):
    """A KV-cached (serving) path was asked to run with prefix knowledge, which it does not support."""


def refuse_prefix_serving(adapter_dir) -> None:
    """Raise ``PrefixServingError`` when the adapter folder holds prefix knowledge: the serving paths
    (``inference.generate``, split inference) run their own KV cache, which a prefix would have to
    fill first; they would silently answer without the knowledge. Evaluate with peft's own
    ``generate`` instead (``PeftModel.from_pretrained`` loads the folder)."""
    import json
    from pathlib import Path

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") == "PREFIX_TUNING":
        raise PrefixServingError(f"{adapter_dir} holds prefix knowledge (peft.method prefix), which serving does not "
                                 "support yet: train with peft.method lora to serve, or load the folder with "
                                 "peft's PeftModel.from_pretrained and its generate")


def kv_geometry(config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a causal LM config (GPT-2 or Llama, GQA included)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(layers), int(kv_heads), int(head_dim)


def is_prefix_knowledge(state: dict) -> bool:
    """Whether a state dict holds prefix knowledge (per-block keys or peft's single tensor)."""
    return any(k == PEFT_PREFIX_KEY or _PREFIX_KEY_RE.match(k) for k in state)


def to_peft_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-block knowledge (every block present) -> ``{"prompt_embeddings": (n, L * 2 * kv_dim)}``."""
    layers = sorted(int(_PREFIX_KEY_RE.match(k).group(1)) for k in state)
    if layers != list(range(len(layers))):
        raise ValueError(f"prefix knowledge must hold every block 0..L-1 to be stored for peft; has {layers}")
    return {PEFT_PREFIX_KEY: torch.cat([state[PREFIX_KEY.format(i)] for i in layers], dim=1).contiguous()}


def from_peft_layout(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """``{"prompt_embeddings": (n, L * 2 * kv_dim)}`` -> per-block knowledge (contiguous copies)."""
    weight = state[PEFT_PREFIX_KEY]
    if weight.shape[1] % num_layers:
        raise ValueError(f"prompt_embeddings width {weight.shape[1]} is not a multiple of {num_layers} blocks")
    return {PREFIX_KEY.format(i): chunk.contiguous().clone()
            for i, chunk in enumerate(weight.chunk(num_layers, dim=1))}


def as_block_keys(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """``state`` with peft's single prefix tensor (if any) cut into per-block keys; else unchanged."""
    if PEFT_PREFIX_KEY not in state:
        return state
    rest = {k: v for k, v in state.items() if k != PEFT_PREFIX_KEY}
    return {**rest, **from_peft_layout({PEFT_PREFIX_KEY: state[PEFT_PREFIX_KEY]}, num_layers)}


class PrefixModel(nn.Module):
    """A tier's (part of the) causal LM with trainable key/value prefixes for the blocks it holds.

    Quacks like the ``PeftModel`` the LoRA path uses where ``SplitModel`` and ``models.adapters``
    need it: ``get_base_model()``, ``active_adapter``, ``train()/eval()``, ``parameters()``.
    """

    def __init__(self, lm: nn.Module, num_virtual_tokens: int, layers: set[int]):
        super().__init__()
        self.base_model = lm
        for p in lm.parameters():
            p.requires_grad_(False)
        self.num_layers, self.kv_heads, self.head_dim = kv_geometry(lm.config)
        self.num_virtual_tokens = int(num_virtual_tokens)
        width = 2 * self.kv_heads * self.head_dim
        self.prefix = nn.ParameterDict({  # zeros until the knowledge pulled down overwrites them
            str(i): nn.Parameter(torch.zeros(self.num_virtual_tokens, width)) for i in sorted(layers)})
        self.active_adapter = "default"

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def key_params(self) -> dict[str, nn.Parameter]:
        """Knowledge key -> the live parameter, one per held block."""
        return {PREFIX_KEY.format(i): p for i, p in self.prefix.items()}

    def layer_kv(self, layer: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer``'s prefix as its attention caches it: K and V, each (B, kv_heads, n, head_dim)."""
        p = self.prefix[str(layer)].to(dtype)  # (n, 2 * kv_heads * head_dim)
        kv = p.view(self.num_virtual_tokens, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2, kvh, n, hd)
        shape = (batch, self.kv_heads, self.num_virtual_tokens, self.head_dim)
        return kv[0].unsqueeze(0).expand(shape), kv[1].unsqueeze(0).expand(shape)

    def segment_cache(self, start: int, end: int, batch: int, dtype: torch.dtype):
        """A fresh KV cache holding the prefixes of blocks[start:end] (what peft's ``get_prompt``
        puts there for the whole model); the real tokens then sit at positions n.. after them."""
        from transformers import DynamicCache

        missing = [i for i in range(start, end) if str(i) not in self.prefix]
        if missing:
            raise KeyError(f"blocks {missing} have no prefix on this tier (it holds {sorted(map(int, self.prefix))})")
        cache = DynamicCache(config=self.base_model.config)
        positions = torch.arange(self.num_virtual_tokens, device=self.prefix[str(start)].device)
        for i in range(start, end):
            k, v = self.layer_kv(i, batch, dtype)
            cache.update(k, v, i, cache_kwargs={"cache_position": positions})
        return cache


def attach_prefix(lm: nn.Module, cfg, layers: set[int]) -> PrefixModel:
    """A tier's model: ``lm`` (a part of the foundation) with prefixes for the blocks in ``layers``."""
    return PrefixModel(lm, cfg.num_virtual_tokens, layers)


def attach_peft_prefix(model, cfg, base_name: str | None = None):
    """The cloud's model: plain peft prefix tuning (no projection) over the whole foundation, so
    forward, ``generate``, ``disable_adapter`` and the stored config are peft's own."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                prefix_projection=False, base_model_name_or_path=base_name)
    peft_model = get_peft_model(model, config)
    peft_model.__class__ = _prefix_lm_class(type(peft_model))  # generate that keeps the prefix
    layers, kv_heads, head_dim = kv_geometry(model.config)
    pc = peft_model.peft_config["default"]
    if (pc.num_layers, pc.token_dim, pc.num_attention_heads) != (layers, kv_heads * head_dim, kv_heads):
        raise ValueError(f"peft's prefix geometry (layers {pc.num_layers}, token_dim {pc.token_dim}, heads "
                         f"{pc.num_attention_heads}) differs from the split's ({layers}, {kv_heads * head_dim}, {kv_heads})")
    weight = prompt_weight(peft_model)
    with torch.no_grad():
        weight.copy_(to_peft_layout(initial_prefix(model, cfg.num_virtual_tokens))[PEFT_PREFIX_KEY])
    return peft_model


@torch.no_grad()
def initial_prefix(lm, num_virtual_tokens: int) -> dict[str, torch.Tensor]:
    """The fresh prefix: every block's keys and values of the model itself reading ``n`` BOS tokens
    at positions 0..n-1 (its own KV cache, RoPE included), so the fresh knowledge is the base with
    a preamble of BOS tokens, which a pretrained model treats as attention sinks: close to the bare
    base (a random prefix dilutes every block's attention instead). Without a BOS id: N(0, 0.02)."""
    from transformers import DynamicCache

    layers, kv_heads, head_dim = kv_geometry(lm.config)
    bos = getattr(lm.config, "bos_token_id", None)
    if bos is None:
        gen = torch.Generator().manual_seed(0)
        return {PREFIX_KEY.format(i): torch.randn(num_virtual_tokens, 2 * kv_heads * head_dim, generator=gen) * INIT_STD
                for i in range(layers)}
    device = next(lm.parameters()).device
    ids = torch.full((1, num_virtual_tokens), int(bos), dtype=torch.long, device=device)
    cache = DynamicCache(config=lm.config)
    was_training = lm.training
    lm.eval()
    lm(input_ids=ids, cache=cache, use_cache=True)
    lm.train(was_training)
    out = {}
    for i in range(layers):
        k, v = cache.layers[i].keys[0], cache.layers[i].values[0]  # (kv_heads, n, head_dim) each
        kv = torch.stack([k, v]).permute(2, 0, 1, 3)  # (n, 2, kv_heads, head_dim)
        out[PREFIX_KEY.format(i)] = kv.reshape(num_virtual_tokens, -1).float().cpu().contiguous()
    return out


def _prefix_lm_class(peft_cls: type) -> type:
    """``peft_cls`` (peft's ``PeftModelForCausalLM``) with a ``generate`` that keeps the prefix.

    Under transformers 5 ``generate`` passes its own KV cache as ``cache``, which wins over the
    ``past_key_values`` peft 0.21 puts the prefix in: peft's generate then silently answers as
    the bare base. This one hands the prefix to ``generate`` as its cache (peft's ``get_prompt``),
    behind ``n`` placeholder ids with a mask of ones, so the real tokens sit at positions n.. exactly
    as in peft's forward; the placeholders are cut off the output again."""
    global _PREFIX_LM
    if _PREFIX_LM is None:
        class PrefixTunedLM(peft_cls):
            def generate(self, *args, input_ids=None, attention_mask=None, **kwargs):
                base = self.get_base_model()
                if "forward" in self.__dict__:  # inside disable_adapter(): the bare base
                    return base.generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                if args or input_ids is None or kwargs.get("cache") is not None:
                    raise PrefixServingError("prefix generate takes input_ids (and attention_mask) by keyword, "
                                             "and no cache of its own")
                n = self.active_peft_config.num_virtual_tokens
                batch = input_ids.shape[0]
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
                fill = torch.zeros(batch, n, dtype=input_ids.dtype, device=input_ids.device)
                mask = torch.cat([torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device),
                                  attention_mask], dim=1)  # (B, n + T)
                out = base.generate(input_ids=torch.cat([fill, input_ids], dim=1), attention_mask=mask,
                                    cache=self.get_prompt(batch), **kwargs)
                if hasattr(out, "sequences"):  # return_dict_in_generate
                    out.sequences = out.sequences[:, n:]
                    return out
                return out[:, n:]  # (B, T + new): as generate returns it without a prefix

        _PREFIX_LM = PrefixTunedLM
    return _PREFIX_LM


_PREFIX_LM: type | None = None


def is_peft_prefix(model) -> bool:
    """Whether ``model`` is a peft model whose active adapter is prefix tuning."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or isinstance(model, PrefixModel):
        return False
    config = configs.get(getattr(model, "active_adapter", None))
    return getattr(config, "peft_type", None) is not None and str(config.peft_type.value) == "PREFIX_TUNING"


def prompt_weight(peft_model) -> nn.Parameter:
    """The (n, L * 2 * kv_dim) prefix parameter of a peft prefix-tuned model."""
    return peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight


def peft_prefix_state(peft_model) -> dict[str, torch.Tensor]:
    """Per-block knowledge of a peft prefix-tuned model (detached CPU copies)."""
    layers = peft_model.peft_config[peft_model.active_adapter].num_layers
    return from_peft_layout({PEFT_PREFIX_KEY: prompt_weight(peft_model).detach().to("cpu")}, layers)


def load_peft_prefix_state(peft_model, state: dict[str, torch.Tensor], *, strict: bool = False) -> int:
    """Copy per-block (or peft-layout) prefix knowledge into a peft prefix model's weight in place."""
    weight = prompt_weight(peft_model)
    layers = peft_model.peft_config[peft_model.active_adapter].num_layers
    width = weight.shape[1] // layers
    loaded = 0
    with torch.no_grad():
        for key, value in as_block_keys(state, layers).items():
            m = _PREFIX_KEY_RE.match(key)
            if m is None or int(m.group(1)) >= layers:
                if strict:
                    raise KeyError(f"adapter key '{key}' is not in the model")
                continue
            i = int(m.group(1))
            if tuple(value.shape) != (weight.shape[0], width):
                raise ValueError(f"adapter key '{key}': shape {tuple(value.shape)} != model {(weight.shape[0], width)}")
            weight[:, i * width:(i + 1) * width].copy_(value.to(weight.device, weight.dtype))
            loaded += 1
    if strict and loaded != layers:
        raise KeyError(f"prefix knowledge holds {loaded} of the model's {layers} blocks")
    return loaded
