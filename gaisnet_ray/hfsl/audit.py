"""Record every message that crosses an actor boundary, to prove what leaves a node.

Actors call ``record`` with the arguments they receive and the values they return. Tensors are
kept (copied) so a check can compare them against private data; objects that are not plain data
(actor handles, tokenizers, configs) are kept as their type name only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


def _plain(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__,
                **{f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    return {"__type__": type(obj).__name__}


class MessageAudit:
    def __init__(self, node_id: str, enabled: bool):
        self.node_id = node_id
        self.enabled = enabled
        self.records: list[dict] = []

    def record(self, method: str, direction: str, payload) -> None:
        if self.enabled:
            self.records.append({"node": self.node_id, "method": method, "direction": direction,
                                 "payload": _plain(payload)})

    def dump(self, directory: str | Path) -> Path | None:
        if not self.enabled:
            return None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.node_id}.pt"
        torch.save(self.records, path)
        return path


def walk_payload(obj, path: str = "", parent: dict | None = None):
    """Yield (path, leaf, parent) for every leaf of a recorded payload; ``parent``: the dict the
    leaf sits in (a dataclass is recorded as a dict with its ``__type__``), so a check can ask what
    kind of message a tensor belongs to (``hfsl.linkcodec.audit_wire_leaf``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_payload(v, f"{path}/{k}", obj)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk_payload(v, f"{path}[{i}]", parent)
    else:
        yield path, obj, parent or {}
