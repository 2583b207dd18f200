"""Binary tensor payloads for split inference over HTTP (safetensors bytes, never JSON lists)."""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

KEY = "hidden"


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return save({KEY: t.detach().to("cpu").contiguous()})


def tensor_from_bytes(payload: bytes) -> torch.Tensor:
    """Decode a payload made by ``tensor_to_bytes``; a malformed one raises ValueError."""
    try:
        tensors = load(payload)
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"payload is not a safetensors buffer: {e}") from None
    if KEY not in tensors:
        raise ValueError(f"payload has no '{KEY}' tensor (found {sorted(tensors)})")
    return tensors[KEY]
