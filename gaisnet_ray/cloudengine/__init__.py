"""The cloud training engine: full-parameter training of the foundation model in plain torch or
DeepSpeed (ZeRO 0-3, offload, bf16, gradient accumulation), checkpoints, resume, HF export.

Core code: no Ray import, and deepspeed is imported only when a DeepSpeed engine is built.
Its settings (the ``cloud:`` section) live in the config layer, ``gaisnet_ray.config.cloud``; the
trainer and the world load on first use, so importing this package never pulls in torch or the
data package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import CloudEngineConfig

if TYPE_CHECKING:
    from .checkpoint import CheckpointError
    from .dsconfig import deepspeed_config
    from .engine import CloudTrainer
    from .world import WorldError

__all__ = ["CheckpointError", "CloudEngineConfig", "CloudTrainer", "WorldError", "deepspeed_config"]

_LAZY = {"CheckpointError": "checkpoint", "CloudTrainer": "engine", "deepspeed_config": "dsconfig",
         "WorldError": "world"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
