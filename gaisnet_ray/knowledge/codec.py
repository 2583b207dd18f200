"""Byte accounting for every transfer between tiers, and content hashing.

Only tensor (and array/bytes) payload is counted: numbers, strings, enums and
similar metadata count 0 bytes, since metrics and labels are negligible next to
adapter weights and activations.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import operator
import pathlib
from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np
import torch

Link = Literal["end_edge", "edge_cloud"]
Direction = Literal["up", "down"]
LINKS: tuple[str, ...] = get_args(Link)
DIRECTIONS: tuple[str, ...] = get_args(Direction)

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


def _check_link_direction(link: str, direction: str) -> None:
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; expected one of {LINKS}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")


@dataclasses.dataclass
class ByteCounter:
    """Bytes moved per (link, direction); "up" is towards the cloud."""

    end_edge_up: int = 0
    end_edge_down: int = 0
    edge_cloud_up: int = 0
    edge_cloud_down: int = 0

    def add(self, link: Link, direction: Direction, nbytes: int) -> None:
        _check_link_direction(link, direction)
        if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__") or operator.index(nbytes) < 0:
            raise ValueError(f"nbytes must be an integer >= 0; got {nbytes!r}")
        name = f"{link}_{direction}"
        setattr(self, name, getattr(self, name) + operator.index(nbytes))

    def get(self, link: Link, direction: Direction) -> int:
        _check_link_direction(link, direction)
        return getattr(self, f"{link}_{direction}")

    def merge(self, other: ByteCounter) -> ByteCounter:
        """A new counter holding the sum of both; neither input changes."""
        return ByteCounter(**{k: v + getattr(other, k) for k, v in self.to_dict().items()})

    def total(self, direction: Direction | None = None) -> int:
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
        return sum(v for k, v in self.to_dict().items() if direction is None or k.endswith(f"_{direction}"))

    def to_dict(self) -> dict[str, int]:
        """Keys "end_edge_up", "end_edge_down", "edge_cloud_up", "edge_cloud_down"."""
        return {f"{link}_{d}": getattr(self, f"{link}_{d}") for link in LINKS for d in DIRECTIONS}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> ByteCounter:
        """Inverse of to_dict; missing keys count 0, unknown keys raise ValueError."""
        known = {f"{link}_{d}" for link in LINKS for d in DIRECTIONS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ByteCounter keys {unknown}; expected a subset of {sorted(known)}")
        counter = cls()
        for key, value in d.items():
            link, direction = key.rsplit("_", 1)
            counter.add(link, direction, value)  # type: ignore[arg-type]  # validated above
        return counter


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
