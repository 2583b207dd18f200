"""The DeepSpeed config dict a ``CloudTrainer`` builds its engine from, generated from the ``cloud:``
settings (ZeRO stage, offload, precision, accumulation, workers) plus the caller's overrides."""

from __future__ import annotations

from ..config import CloudEngineConfig


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(settings: CloudEngineConfig, micro_batch_size: int = 1, overrides: dict | None = None) -> dict:
    """The DeepSpeed config dict for ``settings`` (one process: train batch = micro x accumulation).

    ``micro_batch_size`` only feeds DeepSpeed's bookkeeping (samples counted, throughput logs); the
    batches ``step`` receives may have any size. ``overrides`` is merged in last (nested dicts
    merge), for DeepSpeed options the settings do not cover, e.g.
    ``{"zero_optimization": {"stage3_param_persistence_threshold": 0}}``.
    """
    zero: dict = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum_steps,
        "train_batch_size": micro_batch_size * settings.grad_accum_steps * settings.workers,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.precision == "bf16"},
        "gradient_clipping": 0.0,
        # a torch optimizer with offload is allowed (on the CPU it is the same work as cpu_adam)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merged(config, overrides or {})
