"""Helpers the split-equivalence tests share (tiny presets and real-weight slices alike)."""

from __future__ import annotations

import torch

from gaisnet_ray.models.adapters import trainable_parameters


def randomize_lora(peft_model, seed: int = 0, std: float = 0.05) -> None:
    """peft starts LoRA B at zero (A gets no gradient then); give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(peft_model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_grads(peft_model) -> dict[str, torch.Tensor]:
    """Gradients of the adapter weights, keyed like get_peft_model_state_dict (adapter name dropped)."""
    out = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            out[name.replace(".default.", ".")] = p.grad.detach().clone()
    return out
