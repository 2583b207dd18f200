"""One typed, validated configuration tree for a GaisNet run.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in a YAML file or a
``--set`` override stops the run before any work with an error naming the key. Each component gets
only its own sub-config (``cfg.model``, ``cfg.training`` ...), never the whole tree.

The bottom layer of the package: the schemas of every section live here, one module per part of
the run (``model``, ``data``, ``topology``, ``training``, ``privacy``, ``run``, and the ``cloud``
engine's, the ``planner``'s and ``serve``'s settings), the root in ``tree``, reading YAML in
``loading``. Nothing here imports the modules that use a section; they import it from here.
"""

from __future__ import annotations

from ..tiers import TIER_RESOURCES
from .cloud import CloudEngineConfig
from .data import DataConfig
from .loading import (_deep_merge,  # noqa: F401 - tests use it
                      apply_overrides, config_to_yaml, default_config, default_config_dict, load_config)
from .model import ModelConfig, PeftConfig
from .planner import DeviceClass, DeviceSpec, PlannerConfig
from .privacy import PrivacyConfig
from .run import RunConfig
from .section import ConfigError, Section
from .serve import LearnSettings, RoutingSettings, ServeSettings, ServeTier
from .topology import CutConfig, LinkConfig, LinksConfig, TierResources, TopologyConfig, device_id, edge_id
from .training import FaultConfig, RelayConfig, TrainingConfig
from .tree import Config

__all__ = [
    "Config", "ConfigError", "Section",
    "load_config", "default_config", "default_config_dict", "apply_overrides", "config_to_yaml",
    "ModelConfig", "PeftConfig", "DataConfig",
    "TopologyConfig", "TierResources", "CutConfig", "LinksConfig", "LinkConfig", "device_id", "edge_id",
    "TrainingConfig", "RelayConfig", "FaultConfig", "PrivacyConfig", "RunConfig",
    "CloudEngineConfig", "PlannerConfig", "DeviceSpec", "DeviceClass",
    "ServeSettings", "ServeTier", "RoutingSettings", "LearnSettings",
    "TIER_RESOURCES",
]
