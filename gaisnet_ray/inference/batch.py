"""Several requests decoded together: one KV-cached forward pass per step for the whole batch.

Why: on a CPU (and more so a GPU) one forward over B rows costs far less than B forwards over one
row, so a tier that batches the requests it holds at once serves more of them per second.

How: prompts are left-padded to one length, with an attention mask that hides the padding and
position ids counted from each row's first real token, so every row sees exactly what it would
see alone (the batched greedy tokens equal the one-at-a-time ones; ``tests/test_batch_generate.py``).
Each row keeps its own ``RowDecoder``: its sampling settings and seeded generator, stop strings,
token budget and confidence. A row that finishes leaves the batch at once: its cache rows are
dropped (``DynamicCache.batch_select_indices``) and the others go on, so a short answer never
waits for a long one and never costs a forward after it ended.

All rows of one batch run one model (one adapter at one version): the serving tier groups requests
by the model they hold (``serve/replica.py`` says why per-row adapters are not mixed in one pass).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import DynamicCache

from .generate import Generation, RowDecoder


@dataclass(frozen=True)
class BatchRow:
    """One request of a batch: its prompt's token ids and its own decoding settings."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    probe_tokens: int | None = None  # emit the Confidence of the first k tokens (RowDecoder)
    # set by the consumer that went away (a cancelled stream): the row leaves the batch at the next step
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)


@dataclass
class BatchCounters:
    """What batching did, for /health and the tests: batches run, rows in them, the largest batch,
    forward passes, and row-steps (rows summed over forwards; ``row_steps / forwards`` is the mean
    number of requests one forward pass served)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    forwards: int = 0
    row_steps: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def batch(self, rows: int) -> None:
        with self._lock:
            self.batches += 1
            self.rows += rows
            self.largest = max(self.largest, rows)

    def forward(self, rows: int) -> None:
        with self._lock:
            self.forwards += 1
            self.row_steps += rows

    def info(self) -> dict:
        with self._lock:
            return {"batches": self.batches, "rows": self.rows, "largest": self.largest, "forwards": self.forwards,
                    "row_steps": self.row_steps,
                    "rows_per_forward": round(self.row_steps / self.forwards, 3) if self.forwards else 0.0}


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0


@torch.no_grad()
def batch_stream(model, tokenizer, rows: list[BatchRow],
                 counters: BatchCounters | None = None) -> Iterator[list[list[str | Generation]]]:
    """Decode ``rows`` together. Yields once per step a list with one entry per row: the text deltas
    (and a probe ``Confidence``) that row produced in the step, followed by its ``Generation`` in the
    step it finished (after which its entries stay empty; a cancelled row's stay empty without one).
    ``model``: a causal LM (plain or peft) taking ``cache=``."""
    device = next(model.parameters()).device
    decoders = [RowDecoder(tokenizer, len(r.prompt_ids), max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                           top_p=r.top_p, seed=r.seed, stop=r.stop, probe_tokens=r.probe_tokens) for r in rows]
    out: list[list[str | Generation]] = [[d.result()] if d.done else [] for d in decoders]
    live = [i for i, d in enumerate(decoders) if not d.done]
    if counters is not None:
        counters.batch(len(rows))
    if not live:
        yield out
        return
    width = max(len(rows[i].prompt_ids) for i in live)
    pad = _pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(rows[i].prompt_ids)) + list(rows[i].prompt_ids) for i in live],
                       device=device)  # (b, T) left-padded
    mask = torch.tensor([[0] * (width - len(rows[i].prompt_ids)) + [1] * len(rows[i].prompt_ids) for i in live],
                        device=device)  # (b, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
    cache = DynamicCache(config=model.config)
    while True:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]  # (b, V)
        if counters is not None:
            counters.forward(len(live))
        keep = []
        for j, i in enumerate(live):
            out[i].extend(decoders[i].step(logits[j]))
            if decoders[i].done:
                out[i].append(decoders[i].result())
            else:
                keep.append(j)
        yield out
        out = [[] for _ in rows]
        keep = [j for j in keep if rows[live[j]].cancel is None or not rows[live[j]].cancel.is_set()]
        if not keep:
            return
        if len(keep) < len(live):  # finished rows leave the batch, their cache rows with them
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            live = [live[j] for j in keep]
        ids = torch.tensor([[decoders[i].out[-1]] for i in live], device=device)  # (b, 1)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1


def generate_batch(model, tokenizer, rows: list[BatchRow], counters: BatchCounters | None = None) -> list[Generation]:
    """``batch_stream`` run to the end: each row's ``Generation``, in order."""
    results: list[Generation | None] = [None] * len(rows)
    for step in batch_stream(model, tokenizer, rows, counters):
        for i, items in enumerate(step):
            for item in items:
                if isinstance(item, Generation):
                    results[i] = item
    return results  # type: ignore[return-value]


def rows_for(generator, prompts: list[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
             chat: bool = True) -> list[BatchRow]:
    """Batch rows for ``prompts`` under a ``CausalGenerator``'s prompt format and limits (a prompt
    over the limit raises ``PromptTooLongError``), every row with the same settings."""
    out = []
    for p in prompts:
        ids = generator.encode_prompt(p, chat)
        out.append(BatchRow(tuple(ids), generator.new_tokens_for(ids, max_new_tokens), temperature, top_p, seed,
                            tuple(stop) if stop else None))
    return out
