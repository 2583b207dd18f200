"""``training:``, ``relay:`` and ``faults:``: the rounds of fine-tuning, how the cloud absorbs each
round's knowledge into its foundation model, and what a round does when a device or edge fails."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .section import Section


class TrainingConfig(Section):
    scheme: Literal["hfsl", "fl", "sl", "centralized", "local"] = Field(
        "hfsl", description="hfsl: clusters in parallel, members in turn, split model; "
        "fl: FedAvg of the whole adapter trained on devices; sl: one cluster per edge. Baselines: "
        "centralized: every device's data pooled in one trainer (NOT private: the upper bound); "
        "local: each device trains alone and keeps its own adapter (needs relay.policy none)."
    )
    pretrain_steps: int = Field(
        150, ge=0, description="Cloud pre-training steps of the whole foundation model on public "
        "data before round 1 (0 = use the foundation as built or loaded)."
    )
    pretrain_lr: float = Field(3e-3, gt=0, description="Cloud pre-training learning rate (cosine decay).")
    pretrain_batch_size: int = Field(32, ge=1, description="Cloud pre-training batch size.")
    rounds: int = Field(4, ge=1, description="Fine-tuning rounds (device -> edge -> cloud).")
    participants_per_edge: int | None = Field(
        None, ge=1, description="Devices sampled (seeded per round) to train in each round at each edge; None: all."
    )
    local_steps: int = Field(6, ge=1, description="Optimizer steps per device turn.")
    batch_size: int = Field(16, ge=1, description="Device batch size per step.")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate of the adapters (device and edge).")
    edge_lr: float | None = Field(
        None, ge=0, description="AdamW learning rate of the edges' middle adapter under a split scheme; None: lr. "
        "0: the edges train nothing, their blocks run the base and only pass gradients back (for "
        "privacy.activation_noise at a deep cut: the middle computes on noise-dominated rows, and what it would "
        "learn from them is merged into the base; README, Privacy)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    aggregation: Literal["fedavg", "median", "trimmed_mean"] = Field(
        "fedavg", description="Rule at the edge (over clusters) and the cloud (over edges)."
    )
    trim_ratio: float = Field(0.1, ge=0, lt=0.5, description="Fraction trimmed at each end.")
    clip_norm: float | None = Field(None, gt=0, description="Clip each update's L2 norm.")
    server_lr: float = Field(
        1.0, gt=0, le=10, description="The cloud's global step (FedOpt's server learning rate, Reddi et al. 2021): "
        "the new knowledge is the last version plus server_lr x (the edges' aggregate - the last version). 1: plain "
        "aggregation. >1 undoes the dilution of averaging edges that learned different domains (each edge's change "
        "counts more). Applied after privacy.dp_* noise (post-processing: the reported epsilon holds).")
    eval_every: int = Field(1, ge=1, description="Evaluate every N rounds (and always the last).")
    seed: int = Field(0, description="Seed for batch order and pre-training.")


# --------------------------------------------------------------------------------------- relay
class RelayConfig(Section):
    policy: Literal["none", "merge", "distill"] = Field(
        "merge", description="How the cloud absorbs each round's relayed knowledge into its foundation model, "
        "data-free: none (the base stays fixed); merge (fold the global adapter into the base weights); distill "
        "(the base learns, by KL in the cloud engine, the edges' adapters on inputs the cloud generates itself). "
        "The new base goes back down to edges and devices and the next round starts from it."
    )
    distill_samples: int = Field(96, ge=1, description="Self-generated training inputs per distillation.")
    distill_heldout: int = Field(32, ge=1, description="Self-generated held-out inputs the KL is measured on.")
    distill_steps: int = Field(30, ge=1, description="Optimizer steps of each distillation.")
    distill_batch_size: int = Field(16, ge=1, description="Inputs per distillation step.")
    distill_lr: float = Field(1e-3, gt=0, description="Learning rate of the distilled base (cosine decay).")
    distill_temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of the teachers when they generate the inputs."
    )
    distill_seq_len: int | None = Field(
        None, ge=2, description="Tokens per self-generated input; None: model.max_seq_len."
    )
    distill_inputs: Literal["bos", "chat"] = Field(
        "chat", description="Where each teacher (the base with one edge's adapter) starts the inputs it writes. "
        "chat: the chat template's prefix with the run's public data.system_prompt and an open user turn, so the "
        "teacher writes a user question and then, after the template's assistant header, its answer: an adapter "
        "that learned the devices' domains asks about them (without a chat template: BOS, then the seed turns "
        "below). bos: sample from the BOS token alone (on a chat model this rarely leaves the first turn). Either "
        "way data-free: the inputs are a function of the base, the adapters, the seed and this config only."
    )
    distill_targets: Literal["token", "sequence"] = Field(
        "sequence", description="How the teachers' next-token distributions mix into the targets, with the edges' "
        "sample counts as weights. token: the same weights at every position. sequence: the mixture of the teachers "
        "as models of whole sequences, each weighted at each position by how likely it finds the input so far, so on "
        "a conversation about one edge's domain the target is that edge's teacher rather than an average with "
        "teachers that never learned it."
    )
    distill_bos_fraction: float = Field(
        0.0, ge=0, le=1, description="With distill_inputs chat: this share of each teacher's inputs is sampled "
        "from BOS instead (mixing in what the teacher writes unprompted)."
    )
    distill_seed_prompts: list[str] = Field(
        default_factory=list, description="With distill_inputs chat: generic public openings of the user turn "
        "(e.g. 'What'), used in turn; the teacher continues each one. Configuration, not device data. Empty: "
        "the user turn opens empty."
    )
    rehearse_steps: int = Field(
        0, ge=0, description="After absorbing a round's knowledge, train the whole new base this many steps on the "
        "cloud's own public data (data.public_domains), so absorbing the devices' knowledge does not erase what "
        "the foundation knew (rehearsal; the cloud engine, on the cloud alone); 0: none."
    )
    rehearse_lr: float = Field(2e-5, gt=0, description="Learning rate of the rehearsal steps (cosine decay).")
    rehearse_batch_size: int = Field(8, ge=1, description="Public examples per rehearsal step.")


# -------------------------------------------------------------------------------------- faults
class FaultConfig(Section):
    turn_timeout_s: float | None = Field(
        None, gt=0, description="Drop a device whose turn has not finished after this many seconds (it sits out "
        "the round; its cluster goes on from the last member that finished); None: run.actor_timeout_s."
    )
    edge_failure: Literal["reassign", "sit_out"] = Field(
        "reassign", description="When an edge dies, its devices join the surviving edge with the fewest devices "
        "from the next round on (reassign), or sit out the rest of the run (sit_out). The round it died in "
        "completes without it."
    )
    min_edge_updates: int = Field(
        1, ge=1, description="A round needs at least this many edge updates to aggregate; fewer stops the run "
        "(every finished round stays on disk; `gaisnet run --resume` continues)."
    )
