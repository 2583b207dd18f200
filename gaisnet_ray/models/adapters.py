"""LoRA knowledge on a foundation model, via peft.

Knowledge is exchanged only as ``get_peft_model_state_dict`` dicts (keys like
``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``); a segment owns the keys of its
blocks (see ``split.owner_of_key``).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from ..config import PeftConfig

DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_config(cfg: PeftConfig, family: str, base_name: str | None = None) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules or DEFAULT_TARGETS[family]),
        fan_in_fan_out=family == "gpt2",  # GPT-2 uses Conv1D (weights stored transposed)
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )


def attach_lora(model, cfg: PeftConfig, family: str, base_name: str | None = None) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only adapter parameters require grad."""
    return get_peft_model(model, lora_config(cfg, family, base_name))


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Detached CPU copy of the adapter weights present in ``model`` (a pruned model gives a subset)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def _state_key_to_param(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Map each peft state-dict key to the live parameter (adapter name stripped, like peft does)."""
    name = model.active_adapter
    out = {}
    for pname, param in model.named_parameters():
        if f".{name}." in pname and "lora_" in pname:
            out[pname.replace(f".{name}.", ".")] = param
    return out


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor], *, strict: bool = False) -> int:
    """Copy adapter tensors from ``state`` into ``model`` in place; returns how many were loaded.

    Keys the (possibly pruned) model does not hold are skipped unless ``strict``; a key the model
    holds with a different shape always raises. Copying in place keeps optimizer references valid.
    """
    params = _state_key_to_param(model)
    loaded = 0
    with torch.no_grad():
        for key, value in state.items():
            param = params.get(key)
            if param is None:
                if strict:
                    raise KeyError(f"adapter key '{key}' is not in the model")
                continue
            if param.shape != value.shape:
                raise ValueError(f"adapter key '{key}': shape {tuple(value.shape)} != model {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))
            loaded += 1
    return loaded


def trainable_parameters(model: PeftModel) -> list[torch.nn.Parameter]:
    return list(_state_key_to_param(model).values())


def base_key(name: str) -> str:
    """The foundation's state-dict name of a peft base-model tensor (peft inserts ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def load_base_state(model: PeftModel, base_state: dict[str, torch.Tensor]) -> int:
    """Overwrite the frozen foundation weights ``model`` holds (a pruned tier model holds a subset)
    with ``base_state`` (the foundation's own state-dict names); adapter weights are untouched.
    Returns the bytes written (tied weights counted once).

    This is how a new base version reaches edges and devices after a relay: in place, so the
    tier's adapter, optimizer references and pruning stay as they are.
    """
    written, seen = 0, set()
    with torch.no_grad():
        for name, tensor in model.get_base_model().state_dict(keep_vars=True).items():
            if "lora_" in name or id(tensor) in seen:
                continue
            key = base_key(name)
            value = base_state.get(key)
            if value is None:
                if isinstance(tensor, torch.nn.Parameter):
                    raise KeyError(f"the new base has no '{key}', which this model holds")
                continue  # a non-persistent buffer the foundation's state dict does not carry
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"base key '{key}': shape {tuple(value.shape)} != model {tuple(tensor.shape)}")
            seen.add(id(tensor))
            tensor.data.copy_(value.to(tensor.device, tensor.dtype))
            written += tensor.numel() * tensor.element_size()
    return written


def merged_base_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The foundation's weights with the active adapter folded in (W + scale * B @ A), under the
    foundation's own state-dict names; ``model`` itself is left unchanged (peft merges a copy)."""
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().to("cpu", copy=True) for k, v in merged.state_dict().items()}
