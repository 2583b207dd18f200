"""``data:``: the private data devices hold, the cloud's public data, and how it is partitioned."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .section import Section


class DataConfig(Section):
    source: Literal["builtin", "jsonl"] = Field("builtin", description="Built-in domains or your JSONL files.")
    domains: list[str] = Field(
        default_factory=lambda: ["arithmetic", "strings", "units", "facts"],
        description="Built-in domains devices hold privately (source=builtin).",
    )
    public_domains: list[str] | None = Field(
        None, description="Built-in domains in the cloud's public data (None: the same as `domains`)."
    )
    train_path: str | None = Field(None, description="JSONL of {prompt, answer, domain} (jsonl).")
    eval_path: str | None = Field(None, description="Held-out JSONL for evaluation (jsonl).")
    public_path: str | None = Field(None, description="Public JSONL for the cloud (jsonl).")
    samples_per_device: int = Field(192, ge=1, description="Private examples per device (builtin).")
    public_samples: int = Field(512, ge=0, description="Public examples the cloud pre-trains on.")
    eval_samples_per_domain: int = Field(48, ge=1, description="Held-out examples per domain.")
    partition: Literal["iid", "dirichlet"] = Field("dirichlet", description="How private data splits over devices.")
    dirichlet_alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; small = more non-IID.")
    seed: int = Field(0, description="Seed for sampling and partitioning data.")
    system_prompt: str | None = Field(
        None, description="System turn before every prompt when the tokenizer has a chat template (training, "
        "evaluation and serving alike); None: the template's own default. Ignored without a template."
    )

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "jsonl" and not self.train_path:
            raise ValueError("data.train_path is required when data.source is 'jsonl'")
        if not self.domains and self.source == "builtin":
            raise ValueError("data.domains must name at least one built-in domain")
        return self
