"""``run:``: where the run folder goes and how the driver and its actors behave on this machine."""

from __future__ import annotations

from pydantic import Field

from .section import Section


class RunConfig(Section):
    out_dir: str | None = Field(None, description="Run folder; default runs/<timestamp>.")
    progress: bool = Field(True, description="Show the per-round progress bar.")
    audit_messages: bool = Field(
        False, description="Record every message crossing an actor boundary under audit/."
    )
    local_num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of the local dev-mode Ray node (default: host CPUs)."
    )
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per actor.")
    actor_timeout_s: float = Field(600.0, gt=0, description="Give up on an actor call after this.")
