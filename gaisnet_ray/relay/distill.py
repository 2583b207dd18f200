"""Data-free distillation of the edges' knowledge into the cloud's foundation model.

No device data is involved at any step:

1. Inputs: each teacher (the current base with one edge's relayed adapter) samples sequences from
   the BOS token (``generate_inputs``); the cloud produces its own training inputs. The sampling is
   seeded, so the inputs are a function of the base, the adapters and the seed alone.
2. Targets: the teachers' next-token distributions on those inputs, mixed with the edges' sample
   counts as weights (the cloud's FedAvg weights): log p = logsumexp_e(log w_e + log p_e).
3. Student: the base model itself (every parameter), trained in the cloud engine (torch or a
   DeepSpeed engine with the configured ZeRO stage) on KL(p_teacher || q_student), averaged over
   the input tokens up to and including each sequence's first EOS.

The KL is measured on separately generated held-out inputs before and after, which is the effect
the run folder records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cloudengine import CloudEngineConfig, CloudTrainer
from ..cloudengine.world import WorldSpec
from ..models.adapters import load_adapter_state

StateDict = dict[str, torch.Tensor]


@dataclass
class DistillResult:
    state: StateDict  # the distilled base's full weights (foundation state-dict names)
    kl_before: float  # held-out KL(teachers || base) before distillation
    kl_after: float  # ... and after
    train_kl: list[float] = field(default_factory=list)  # per optimizer step
    num_inputs: int = 0
    num_heldout: int = 0
    seq_len: int = 0
    seed: int = 0
    sample_inputs: list[str] = field(default_factory=list)  # a few decoded inputs, for the run folder

    def summary(self) -> dict:
        return {"kl_before": self.kl_before, "kl_after": self.kl_after, "train_kl_first": self.train_kl[:1],
                "train_kl_last": self.train_kl[-1:], "num_inputs": self.num_inputs,
                "num_heldout": self.num_heldout, "seq_len": self.seq_len, "seed": self.seed,
                "sample_inputs": self.sample_inputs}


@torch.no_grad()
def generate_inputs(teacher, tokenizer, adapters: list[StateDict], n: int, seq_len: int, temperature: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``seq_len`` tokens sampled from BOS, split evenly over the teachers
    (``teacher``: the peft model; each adapter is loaded into it in turn). Returns
    (input_ids (n, T), attention_mask (n, T)); the mask ends at each sequence's first EOS."""
    teacher.eval()
    device = next(teacher.parameters()).device
    per = [n // len(adapters) + (1 if i < n % len(adapters) else 0) for i in range(len(adapters))]
    rows = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        for adapter, k in zip(adapters, per):
            if k == 0:
                continue
            load_adapter_state(teacher, adapter, strict=True)
            start = torch.full((k, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
            out = teacher.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True,
                                   temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=seq_len - 1,
                                   min_new_tokens=1, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
            rows.append(F.pad(out, (0, seq_len - out.shape[1]), value=tokenizer.pad_token_id).cpu())
    ids = torch.cat(rows)
    is_eos = ids == tokenizer.eos_token_id
    after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after_eos).long()
    return ids, mask


@torch.no_grad()
def teacher_log_probs(teacher, adapters: list[StateDict], weights: list[float], ids: torch.Tensor,
                      mask: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """log of the weighted mixture of the teachers' next-token distributions: (n, T, V), float32."""
    teacher.eval()
    device = next(teacher.parameters()).device
    total = float(sum(weights))
    log_w = [math.log(w / total) for w in weights]
    mixed = None
    for adapter, lw in zip(adapters, log_w):
        load_adapter_state(teacher, adapter, strict=True)
        parts = [F.log_softmax(teacher(input_ids=ids[i:i + batch_size].to(device),
                                       attention_mask=mask[i:i + batch_size].to(device)).logits.float(), -1).cpu()
                 for i in range(0, ids.shape[0], batch_size)]
        lp = torch.cat(parts) + lw
        mixed = lp if mixed is None else torch.logaddexp(mixed, lp)
    return mixed


def kl_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over unmasked positions of KL(p_teacher || q_student) (nats), from the student's logits."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_p = batch["teacher_logp"].float()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    mask = batch["attention_mask"].float()
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


@torch.no_grad()
def heldout_kl(model, ids: torch.Tensor, mask: torch.Tensor, teacher_logp: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for i in range(0, ids.shape[0], batch_size):
        b = {"input_ids": ids[i:i + batch_size].to(device), "attention_mask": mask[i:i + batch_size].to(device),
             "teacher_logp": teacher_logp[i:i + batch_size].to(device)}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        n = float(b["attention_mask"].sum())
        total += float(kl_loss(logits, b)) * n
        count += n
    return total / max(count, 1.0)


@dataclass
class DistillData:
    """What every rank of the cloud world trains and measures on: self-generated inputs and the
    teachers' mixed log-probabilities on them (training and held-out). No device data."""

    ids: torch.Tensor  # (n, T) long
    mask: torch.Tensor  # (n, T) long
    logp: torch.Tensor  # (n, T, V) float32
    h_ids: torch.Tensor
    h_mask: torch.Tensor
    h_logp: torch.Tensor
    seq_len: int
    seed: int


def prepare(teacher, tokenizer, adapters: list[StateDict], weights: list[float], *, num_inputs: int,
            num_heldout: int, seq_len: int, temperature: float, seed: int,
            restore: StateDict | None = None) -> DistillData:
    """Generate the inputs (train and held-out, different seeds) and the teachers' targets.

    ``restore``: the adapter to leave loaded in ``teacher`` afterwards (the cloud's global knowledge).
    """
    try:
        ids, mask = generate_inputs(teacher, tokenizer, adapters, num_inputs, seq_len, temperature, seed)
        h_ids, h_mask = generate_inputs(teacher, tokenizer, adapters, num_heldout, seq_len, temperature, seed + 1)
        logp = teacher_log_probs(teacher, adapters, weights, ids, mask)
        h_logp = teacher_log_probs(teacher, adapters, weights, h_ids, h_mask)
    finally:
        if restore is not None:
            load_adapter_state(teacher, restore, strict=True)
    return DistillData(ids, mask, logp, h_ids, h_mask, h_logp, seq_len, seed)


def train_student(student, data: DistillData, *, engine: CloudEngineConfig, steps: int, batch_size: int, lr: float,
                  world: WorldSpec | None = None) -> tuple[StateDict, list[float], float]:
    """KL training of ``student`` in the cloud engine; every rank of a multi-worker world calls it
    with the same data (each draws its own batches; DeepSpeed averages the gradients). Returns the
    gathered weights, the per-step train KL and the held-out KL after (both collectives under
    ZeRO-3, hence on every rank)."""
    rank = world.rank if world is not None else 0
    gen = torch.Generator().manual_seed(data.seed + 2 + 1_000_003 * rank)
    b = min(batch_size, data.ids.shape[0])
    train_kl = []
    with CloudTrainer(student, engine, lr=lr, total_steps=steps, micro_batch_size=b, world=world) as trainer:
        for _ in range(steps):
            micro = []
            for _ in range(engine.grad_accum_steps):
                idx = torch.randint(0, data.ids.shape[0], (b,), generator=gen)
                micro.append(trainer.step({"input_ids": data.ids[idx], "attention_mask": data.mask[idx],
                                           "teacher_logp": data.logp[idx]}, loss_fn=kl_loss))
            train_kl.append(sum(micro) / len(micro))
        state = trainer.state_dict_for(None)  # gathered under ZeRO-3
        kl_after = heldout_kl(trainer.model, data.h_ids, data.h_mask, data.h_logp)
    return state, train_kl, kl_after


def distill(student, teacher, tokenizer, adapters: list[StateDict], weights: list[float], *, engine: CloudEngineConfig,
            num_inputs: int, num_heldout: int, seq_len: int, steps: int, batch_size: int, lr: float,
            temperature: float, seed: int, restore: StateDict | None = None,
            peers: Callable[[DistillData], tuple[WorldSpec | None, Callable[[], object]]] | None = None) -> DistillResult:
    """Distill the teachers (``teacher`` with each of ``adapters``) into ``student`` (a plain
    causal LM with the base's weights) in the cloud engine; returns the new weights and the effect.

    ``peers(data)``: in a multi-worker cloud world, starts ``train_student`` on the other ranks and
    returns this rank's ``WorldSpec`` and a function that waits for them.
    """
    data = prepare(teacher, tokenizer, adapters, weights, num_inputs=num_inputs, num_heldout=num_heldout,
                   seq_len=seq_len, temperature=temperature, seed=seed, restore=restore)
    kl_before = heldout_kl(student, data.h_ids, data.h_mask, data.h_logp)
    world, wait = peers(data) if peers is not None else (None, None)
    # if this rank fails, the others fail too once their collectives time out: no wait then
    state, train_kl, kl_after = train_student(student, data, engine=engine, steps=steps, batch_size=batch_size,
                                              lr=lr, world=world)
    if wait is not None:
        wait()
    samples = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(data.ids[:4], data.mask[:4])]
    return DistillResult(state, kl_before, kl_after, train_kl, int(data.ids.shape[0]), int(data.h_ids.shape[0]),
                         seq_len, seed, samples)
