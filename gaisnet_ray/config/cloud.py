"""``cloud:``: the cloud training engine's settings: plain torch, or DeepSpeed with ZeRO and offload.

Cross-field checks name the fields that conflict, so a bad combination stops the run before any
model is built. The engine itself is ``gaisnet_ray.cloudengine``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .section import Section


class CloudEngineConfig(Section):
    engine: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: plain AdamW in one process (the reference); "
        "deepspeed: a DeepSpeed engine with the ZeRO, offload and precision settings below."
    )
    zero_stage: int = Field(
        0, ge=0, le=3, description="ZeRO stage (deepspeed): 0 none, 1 optimizer state, "
        "2 + gradients, 3 + parameters partitioned over the cloud workers."
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer state and the optimizer step on the CPU (deepspeed, stage >= 1)."
    )
    offload_params: bool = Field(
        False, description="Keep parameters on the CPU between uses (deepspeed, stage 3 only)."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Training precision; bf16 keeps fp32 master weights in the optimizer (deepspeed)."
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; the gradient is the mean of the "
        "micro-batch mean losses' gradients (DeepSpeed's convention, used by both engines)."
    )
    workers: int = Field(
        1, ge=1, description="Cloud workers in one DeepSpeed world (data parallel; ZeRO partitions over them). "
        "Worker 0 is the CloudNode actor, the others CloudWorker actors asking for the same cloud resources."
    )
    checkpoint_every: int = Field(
        0, ge=0, description="Save a resumable checkpoint every N optimizer steps of cloud training "
        "(0: only at the end)."
    )

    @model_validator(mode="after")
    def _check(self) -> "CloudEngineConfig":
        if self.workers > 1 and self.engine != "deepspeed":
            raise ValueError(
                f"cloud.workers ({self.workers}) > 1 needs cloud.engine 'deepspeed'; cloud.engine 'torch' "
                "trains in one process"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"cloud.offload_params (true) needs cloud.zero_stage 3, got cloud.zero_stage {self.zero_stage}"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError(
                "cloud.offload_optimizer (true) needs cloud.zero_stage >= 1, got cloud.zero_stage 0"
            )
        if self.engine == "torch":
            extra = {
                "zero_stage": self.zero_stage != 0,
                "offload_optimizer": self.offload_optimizer,
                "offload_params": self.offload_params,
                "precision": self.precision != "fp32",
            }
            bad = [f"cloud.{k} ({getattr(self, k)!r})" for k, on in extra.items() if on]
            if bad:
                raise ValueError(
                    f"{', '.join(bad)} need cloud.engine 'deepspeed'; cloud.engine 'torch' trains "
                    "fp32 without ZeRO or offload"
                )
        return self
