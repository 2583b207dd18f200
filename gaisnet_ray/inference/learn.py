"""Inference feeds fine-tuning: distil what an edge escalated (prompt + the cloud's answer) into
the edge's adapter, and fold the result into the edge's next aggregation.

Two uses of one distillation (``serve.learn_from_escalations``, settings ``serve.learn.*``):

1. Serving: between rounds (when a new knowledge version reaches the edge replica, or after
   ``serve.learn.every_records`` new escalations) the replica trains a copy of its served edge
   adapter on the escalations it keeps and serves that copy (``serve/escalations.py``).
2. Training (``gaisnet run --serve``): the replica also writes the *delta* it learned (trained
   tensors after minus before) into the edge's private area; the edge's ``EdgeTrainer`` adds
   "this round's starting knowledge + delta" as one more input of its aggregation, weighted by
   the number of escalations and capped at ``serve.learn.max_share`` of the round's weight
   (``escalation_weight``). Only the adapter delta leaves the edge node (as every cluster's
   adapter does); the prompts and answers stay in the edge's area.

Only LoRA B trains: A stays as the knowledge carries it (as with ``peft.freeze_a``), so the delta
is a weight update that averages exactly into FedAvg with the clusters' adapters.
Targets are the cloud's answers as text (sequence-level distillation): the edge learns to say
what the cloud said, with the loss on the answer tokens and eos only, as in training.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..data.encode import IGNORE_INDEX
from ..layout import RunLayout
from .generate import prompt_ids

LEARNED_WEIGHTS_NAME = "learned_delta.safetensors"  # in the edge's private area
LEARNED_META_NAME = "learned.json"

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AnswerPair:
    """One escalation as the distillation reads it: the prompt as the edge saw it, the cloud's text."""

    prompt: str
    answer: str
    chat: bool = True  # the prompt is a user turn (chat-formatted); False: raw completion text


@dataclass
class DistillResult:
    """What one distillation did: the learned delta of each trained tensor, and the answer loss
    (mean token cross-entropy on the cloud's answers) before and after."""

    delta: StateDict
    loss_before: float
    loss_after: float
    steps: int
    records: int
    wall_s: float
    losses: list[float] = field(default_factory=list)


def answer_rows(pairs: list[AnswerPair], tokenizer, system: str | None = None,
                max_len: int | None = None) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels", "attention_mask"}`` (N, T): prompt tokens as generation starts
    from them (``prompt_ids``), then the answer and eos; labels -100 outside answer + eos. Rows
    longer than ``max_len`` are cut at the end (the tail of a long answer is dropped)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    seqs = []
    for p in pairs:
        prompt = prompt_ids(p.prompt, tokenizer, p.chat, system)
        target = list(tokenizer.encode(p.answer, add_special_tokens=False)) + [eos]
        ids, labels = prompt + target, [IGNORE_INDEX] * len(prompt) + target
        if max_len is not None:
            ids, labels = ids[:max_len], labels[:max_len]
        seqs.append((ids, labels))
    t = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), t), pad, dtype=torch.long)  # (N, T)
    labels = torch.full((len(seqs), t), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)  # (N, T)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _loss(model, rows: dict[str, torch.Tensor], device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in rows.items()}
    return model(**batch).loss


@torch.no_grad()
def answer_loss(model, rows: dict[str, torch.Tensor]) -> float:
    """Mean cross-entropy of the answer tokens (+ eos) under ``model``."""
    model.eval()
    return float(_loss(model, rows, next(model.parameters()).device))


def lora_b_parameters(model) -> dict[str, torch.nn.Parameter]:
    """peft state-dict key (adapter name stripped, as ``adapter_state`` gives them) -> the live LoRA
    B tensor of the active adapter (what distillation trains)."""
    name = model.active_adapter
    return {pname.replace(f".{name}.", "."): p for pname, p in model.named_parameters()
            if f".{name}." in pname and "lora_B" in pname}


def distil(model, tokenizer, pairs: list[AnswerPair], *, steps: int, batch_size: int, lr: float,
           seed: int = 0, system: str | None = None, max_len: int | None = None) -> DistillResult:
    """Train ``model``'s LoRA B tensors in place on ``pairs`` (the caller passes a copy of what it
    serves) and return the delta. Batches are drawn without replacement, reshuffled each pass."""
    started = time.perf_counter()
    if not pairs:
        raise ValueError("distil needs at least one escalation")
    params = lora_b_parameters(model)
    if not params:
        raise ValueError("the model has no LoRA B tensors to train (distillation needs an adapter, not the base)")
    device = next(model.parameters()).device
    rows = answer_rows(pairs, tokenizer, system, max_len)
    before = {k: p.detach().clone() for k, p in params.items()}
    loss_before = answer_loss(model, rows)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    try:
        for _ in range(steps):
            if len(order) < min(batch_size, len(pairs)):
                order += rng.sample(range(len(pairs)), len(pairs))
            idx, order = order[:batch_size], order[batch_size:]
            loss = _loss(model, {k: v[idx] for k, v in rows.items()}, device)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p in params.values():
            p.requires_grad_(False)
        model.eval()
    loss_after = answer_loss(model, rows)
    delta = {k: (p.detach() - before[k]).cpu() for k, p in params.items()}
    return DistillResult(delta, loss_before, loss_after, steps, len(pairs), time.perf_counter() - started, losses)


# ------------------------------------------------------------------ the delta, on the edge's node
def edge_area(run_dir: str | Path, store_dir: str | None, edge: str) -> Path:
    """The edge's own folder for its escalations and learned delta: ``store_dir/<edge>`` (a folder
    on the edge's node, ``serve.learn.store_dir``), else ``RUN/edges_private/<edge>``."""
    if not edge or "/" in edge or "\\" in edge or edge.startswith("."):
        raise ValueError(f"'{edge}' is not an edge name")
    return Path(store_dir) / edge if store_dir else RunLayout(run_dir).edge_private(edge)


def save_learned(folder: Path, delta: StateDict, meta: dict) -> None:
    """Write the delta and its record into ``folder`` (the edge's private area), each file
    replaced atomically (temp file, fsync, rename), readable by the owner only."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    weights, record = folder / LEARNED_WEIGHTS_NAME, folder / LEARNED_META_NAME
    tmp_w, tmp_m = weights.with_suffix(".tmp"), record.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in delta.items()}, str(tmp_w))
    tmp_m.write_text(json.dumps(meta, sort_keys=True) + "\n", encoding="utf-8")
    for tmp, final in ((tmp_w, weights), (tmp_m, record)):  # weights first: a record names an existing delta
        os.chmod(tmp, 0o600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)


def load_learned(folder: Path | None) -> tuple[StateDict, dict] | None:
    """The edge's latest learned delta and its record, or None (none yet, or half written)."""
    if folder is None:
        return None
    weights, record = folder / LEARNED_WEIGHTS_NAME, folder / LEARNED_META_NAME
    if not (weights.is_file() and record.is_file()):
        return None
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
        return load_file(str(weights)), meta
    except (OSError, ValueError):
        return None


def escalation_weight(records: int, round_weight: float, max_share: float) -> float:
    """The escalations' weight beside the clusters' ``round_weight`` (their samples): one per
    escalation, at most ``max_share`` of the total: w <= max_share * (round_weight + w)."""
    if records <= 0 or max_share <= 0:
        return 0.0
    return float(min(records, max_share * round_weight / (1.0 - max_share)))


def fold_delta(start: StateDict, delta: StateDict) -> StateDict:
    """``start`` (the round's starting knowledge) with the learned delta added to the tensors it
    holds; the escalations' input to the edge's aggregation. Unknown or misshaped keys are errors."""
    out = dict(start)
    for k, d in delta.items():
        if k not in start:
            raise KeyError(f"learned delta has tensor '{k}', which the knowledge does not hold")
        if start[k].shape != d.shape:
            raise ValueError(f"learned delta '{k}' has shape {tuple(d.shape)}, the knowledge {tuple(start[k].shape)}")
        out[k] = start[k] + d.to(start[k].dtype)
    return out
