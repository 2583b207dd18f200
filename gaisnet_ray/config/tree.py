"""The root of the config tree: one section per component, in the order YAML and the README show
them. Each component gets only its own section, never the whole tree."""

from __future__ import annotations

from pydantic import model_validator

from .cloud import CloudEngineConfig
from .data import DataConfig
from .model import ModelConfig, PeftConfig, check_knowledge_method
from .planner import PlannerConfig
from .privacy import PrivacyConfig
from .run import RunConfig
from .section import Section
from .serve import ServeSettings
from .topology import LinksConfig, TopologyConfig
from .training import FaultConfig, RelayConfig, TrainingConfig


class Config(Section):
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    topology: TopologyConfig = TopologyConfig()
    links: LinksConfig = LinksConfig()
    training: TrainingConfig = TrainingConfig()
    cloud: CloudEngineConfig = CloudEngineConfig()
    relay: RelayConfig = RelayConfig()
    planner: PlannerConfig = PlannerConfig()
    faults: FaultConfig = FaultConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    serve: ServeSettings = ServeSettings()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check_knowledge(self) -> "Config":
        check_knowledge_method(self.peft, self.relay.policy)  # a prefix cannot be merged into the base
        return self
