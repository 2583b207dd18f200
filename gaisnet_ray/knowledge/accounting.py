"""Byte accounting for every transfer between tiers, and content hashing.

Only tensor (and array/bytes) payload is counted: numbers, strings, enums and
similar metadata count 0 bytes, since metrics and labels are negligible next to
adapter weights and activations. The sizes feed ``hfsl.messages.LinkUsage``
(each device turn's end-edge traffic, summed per edge) and the round's
per-link bytes (``hfsl.cloud``); this module only measures.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

_ZERO_BYTE_TYPES = (type(None), bool, int, float, complex, str, enum.Enum, pathlib.PurePath, torch.dtype, torch.device)


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of the tensor's elements: numel * element_size (views count their own numel)."""
    return t.numel() * t.element_size()


def payload_nbytes(obj: Any) -> int:
    """Recursive tensor bytes inside dicts, lists, tuples, sets and dataclass instances.

    Tensors count ``tensor_nbytes``, numpy arrays ``nbytes``, bytes ``len``;
    numbers/strings/None/enums count 0. Any other type raises TypeError so that
    payload hidden in an unknown container is never silently counted as 0.
    """
    if isinstance(obj, torch.Tensor):
        return tensor_nbytes(obj)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, _ZERO_BYTE_TYPES) or isinstance(obj, np.generic):
        return 0
    if isinstance(obj, Mapping):
        return sum(payload_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(payload_nbytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # getattr, not dataclasses.asdict: asdict deep-copies every tensor.
        return sum(payload_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    raise TypeError(f"payload_nbytes cannot size an object of type {type(obj).__qualname__}")


def content_hash(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex over sorted keys, dtype, shape and raw bytes (contiguous, cpu).

    Independent of insertion order, device and memory layout; stable across
    processes and machines of the same (little-endian) byte order.
    """
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"content_hash: value for key {key!r} is {type(t).__qualname__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        header = f"{key}\0{t.dtype}\0{tuple(t.shape)}\0{tensor_nbytes(t)}\0"
        h.update(header.encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes; works for bf16 too
    return h.hexdigest()
