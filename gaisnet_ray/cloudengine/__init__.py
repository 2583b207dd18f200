"""The cloud training engine: full-parameter training of the foundation model in plain torch or
DeepSpeed (ZeRO 0-3, offload, bf16, gradient accumulation), checkpoints, resume, HF export.

Core code: no Ray import, and deepspeed is imported only when a DeepSpeed engine is built.
``settings`` needs only pydantic (``gaisnet_ray.config`` imports it); the trainer and the world
load on first use, so importing the settings never pulls in torch or the data package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import CloudEngineConfig

if TYPE_CHECKING:
    from .engine import CheckpointError, CloudTrainer, deepspeed_config
    from .world import WorldError

__all__ = ["CheckpointError", "CloudEngineConfig", "CloudTrainer", "WorldError", "deepspeed_config"]

_LAZY = {"CheckpointError": "engine", "CloudTrainer": "engine", "deepspeed_config": "engine", "WorldError": "world"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
