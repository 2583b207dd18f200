"""LoRA knowledge on a foundation model, via peft.

Knowledge is exchanged only as ``get_peft_model_state_dict`` dicts (keys like
``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``); a segment owns the keys of its
blocks (see ``split.owner_of_key``).

``peft.method: prefix`` (deep prompts, ``models.prefix``) takes the prefix branches below: its
knowledge is one ``prefix.layers.{i}.key_value`` tensor per block, held by a tier's
``PrefixModel`` or by the cloud's peft prefix-tuned model.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from ..config import PeftConfig
from .prefix import PrefixModel, attach_peft_prefix, is_peft_prefix, load_peft_prefix_state, peft_prefix_state

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
    """Wrap ``model`` with a fresh LoRA adapter; only adapter parameters require grad (only LoRA B
    with ``cfg.freeze_a``: A stays as the knowledge version carried it, the same on every node).
    ``cfg.method`` prefix: the whole model with peft prefix tuning instead (the cloud's model; a tier
    builds a ``PrefixModel`` over its part, ``split.build_tier_model``)."""
    if cfg.method == "prefix":
        return attach_peft_prefix(model, cfg, base_name)
    peft_model = get_peft_model(model, lora_config(cfg, family, base_name))
    if cfg.freeze_a:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Detached CPU copy of the adapter weights present in ``model`` (a pruned model gives a subset)."""
    if isinstance(model, PrefixModel):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.key_params().items()}
    if is_peft_prefix(model):
        return peft_prefix_state(model)
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def _state_key_to_param(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Map each peft state-dict key to the live parameter (adapter name stripped, like peft does)."""
    if isinstance(model, PrefixModel):
        return model.key_params()
    if is_peft_prefix(model):
        raise TypeError("a peft prefix-tuned model holds one tensor for all blocks: no parameter per key")
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
    if is_peft_prefix(model):
        return load_peft_prefix_state(model, state, strict=strict)
    if isinstance(model, PrefixModel):
        from .prefix import as_block_keys

        state = as_block_keys(state, model.num_layers)  # a stored version is in peft's layout
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
    """The adapter parameters an optimizer steps (all LoRA tensors, or only B with ``freeze_a``)."""
    if is_peft_prefix(model):
        from .prefix import prompt_weight

        return [prompt_weight(model)]
    return [p for p in _state_key_to_param(model).values() if p.requires_grad]


def base_key(name: str) -> str:
    """The foundation's state-dict name of a peft base-model tensor (peft inserts ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def load_base_state(model: PeftModel, base) -> int:
    """Overwrite the frozen foundation weights ``model`` holds with a new base; adapter weights are
    untouched. Returns the bytes written (tied weights counted once).

    ``base``: a ``FoundationPackage`` part, which must hold exactly what ``model`` holds (what the
    relay sends a tier: a mismatch is an error naming the keys), or a foundation state dict (the
    foundation's own names), of which the model takes the keys it holds.

    This is how a new base version reaches edges and devices after a relay: in place, so the
    tier's adapter, optimizer references and pruning stay as they are.
    """
    exact = not isinstance(base, dict)
    base_state = base.state_dict if exact else base
    written, seen, used = 0, set(), set()
    with torch.no_grad():
        for name, tensor in model.get_base_model().state_dict(keep_vars=True).items():
            if "lora_" in name:
                continue
            key = base_key(name)
            if id(tensor) in seen:  # a tied weight under its second name
                used.add(key)
                continue
            value = base_state.get(key)
            if value is None:
                if isinstance(tensor, torch.nn.Parameter):
                    raise KeyError(f"the new base has no '{key}', which this model holds")
                continue  # a non-persistent buffer the foundation's state dict does not carry
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"base key '{key}': shape {tuple(value.shape)} != model {tuple(tensor.shape)}")
            seen.add(id(tensor))
            used.add(key)
            tensor.data.copy_(value.to(tensor.device, tensor.dtype))
            written += tensor.numel() * tensor.element_size()
    extra = sorted(set(base_state) - used) if exact else []
    if extra:
        raise ValueError(f"the new base part holds {len(extra)} tensor(s) this tier model does not, e.g. {extra[:3]}: "
                         "the relay must send each tier its own part (FoundationPackage.cut)")
    return written


def base_state_view(model: PeftModel) -> dict[str, torch.Tensor]:
    """The foundation weights ``model`` holds under the foundation's own names: the live tensors
    (detached, nothing copied), so the view follows every in-place change, e.g. ``load_base_state``."""
    return {base_key(name): t.detach() for name, t in model.get_base_model().state_dict(keep_vars=True).items()
            if "lora_" not in name}


def merged_base_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The foundation's weights with the active adapter folded in (W + scale * B @ A), under the
    foundation's own state-dict names, on the CPU; ``model`` itself is left unchanged.

    One new tensor per distinct base weight (tied weights stay one tensor), the same sums peft's
    ``merge_and_unload`` computes, without copying the whole model first.
    """
    from peft.tuners.lora import Linear as LoraLinear

    from .parts import storage_key

    if isinstance(model, PrefixModel) or is_peft_prefix(model):
        raise ValueError("prefix knowledge (peft.method prefix) cannot be merged into the base weights: "
                         "use relay.policy none")

    adapter = model.active_adapter
    lora_layers = {}
    for name, module in model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            if type(module) is not LoraLinear or adapter in module.lora_variant or module.lora_bias[adapter]:
                return _merged_base_state_by_copy(model)  # a LoRA kind merged otherwise: let peft do it
            lora_layers[f"{name}.base_layer.weight"] = module
    out, distinct = {}, {}
    with torch.no_grad():
        for name, tensor in model.get_base_model().state_dict(keep_vars=True).items():
            if "lora_" in name:
                continue
            tensor = tensor.detach()
            ident = storage_key(tensor)
            if ident not in distinct:
                layer = lora_layers.get(name)
                if layer is not None:  # what merge does in place: W += delta
                    distinct[ident] = (tensor + layer.get_delta_weight(adapter)).to("cpu")
                else:
                    distinct[ident] = tensor.to("cpu", copy=True)
            out[base_key(name)] = distinct[ident]
    return out


def _merged_base_state_by_copy(model: PeftModel) -> dict[str, torch.Tensor]:
    import copy

    merged = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().to("cpu", copy=True) for k, v in merged.state_dict().items()}
