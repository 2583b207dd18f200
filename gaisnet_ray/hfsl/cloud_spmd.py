"""The cloud's training jobs, as every rank of a cloud world runs them (core: no Ray).

With ``cloud.workers`` > 1 the cloud trains in one DeepSpeed world: rank 0 is the cloud itself
(``CloudCore``), ranks 1.. are peer workers that run the very same job function with the same
inputs, so the engine's collectives line up (SPMD). Each job is one function here; the cloud asks
its ``CloudPeers`` to start it on the other ranks, then runs it itself.

Peers receive only what the cloud holds: the config (they build the same foundation from it, and
read the cloud's public data), the current base, and the self-generated distillation data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..cloudengine import CloudTrainer
from ..cloudengine.world import WorldError, WorldSpec
from ..config import Config
from ..data import public_examples
from ..layout import RunLayout

Wait = Callable[[], list]


class CloudPeers(Protocol):
    """Ranks 1.. of the cloud world (the Ray runtime's ``RayCloudPeers``)."""

    def start(self, job: str, **kwargs) -> tuple[WorldSpec, Wait]:
        """Start ``job`` on every other rank; return rank 0's spec and a function waiting for them."""
        ...


def pretrain(cfg: Config, model, tokenizer, run_dir: str | Path, torch_device: str = "cpu",
             world: WorldSpec | None = None) -> list[float]:
    """Pre-train the whole foundation on the cloud's public data (torch or DeepSpeed engine);
    checkpoints under ``run_dir/cloud/checkpoints`` (every rank writes its ZeRO partition: a
    multi-node cloud world needs that folder on shared storage) and, with DeepSpeed, a consolidated
    Hugging Face export to ``run_dir/model`` (gathered from every rank, written by rank 0)."""
    t, public = cfg.training, public_examples(cfg.data)
    if t.pretrain_steps <= 0 or not public:
        return []
    run = RunLayout(run_dir)
    model.to(torch_device)
    with CloudTrainer(model, cfg.cloud, lr=t.pretrain_lr, total_steps=t.pretrain_steps,
                      micro_batch_size=t.pretrain_batch_size, world=world) as trainer:
        losses = trainer.train(public, tokenizer, steps=t.pretrain_steps, batch_size=t.pretrain_batch_size,
                               seq_len=cfg.model.max_seq_len, seed=t.seed, checkpoint_dir=run.cloud_checkpoints,
                               system=cfg.data.system_prompt)
        if cfg.cloud.engine == "deepspeed":
            trainer.export_hf(run.model, tokenizer)
    model.to("cpu")
    return losses


def run_peer_job(cfg: Config, run_dir: str | Path, job: str, world: WorldSpec, torch_device: str = "cpu",
                 **kwargs) -> dict:
    """What a peer rank does for ``job``; returns a small summary (its losses) for the logs."""
    if job == "pretrain":
        from ..models.build import build_foundation

        model, tokenizer = build_foundation(cfg.model)  # the same weights as rank 0's (same config, seed)
        losses = pretrain(cfg, model, tokenizer, run_dir, torch_device, world)
        return {"rank": world.rank, "losses": losses}
    if job == "distill":
        from ..relay.distill import train_student

        r = cfg.relay
        student = kwargs["package"].materialize().to(torch_device)
        _, train_kl, kl_after = train_student(student, kwargs["data"], engine=cfg.cloud, steps=r.distill_steps,
                                              batch_size=r.distill_batch_size, lr=r.distill_lr, world=world)
        return {"rank": world.rank, "train_kl": train_kl, "kl_after": kl_after}
    raise ValueError(f"unknown cloud job '{job}'")


def peer_start(cfg: Config, peers: CloudPeers | None, job: str, **kwargs) -> tuple[WorldSpec | None, Wait | None]:
    """Start ``job`` on the other ranks when the cloud has several workers; (None, None) otherwise."""
    if cfg.cloud.workers == 1:
        return None, None
    if peers is None:
        raise WorldError(f"cloud.workers={cfg.cloud.workers} needs the other cloud workers, which the Ray runtime "
                         "starts (gaisnet run); the single-process runtime has one cloud worker")
    return peers.start(job, **kwargs)
