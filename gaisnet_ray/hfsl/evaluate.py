"""Held-out evaluation per domain: answer-token loss and greedy exact match."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from ..data import Example, encode_examples, encode_prompt


@torch.no_grad()
def domain_loss(model, tokenizer, examples: list[Example], seq_len: int, batch_size: int = 64) -> float:
    """Mean cross-entropy over answer tokens (and eos), the same tokens training optimizes."""
    batch = encode_examples(examples, tokenizer, seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, batch["input_ids"].shape[0], batch_size):
        ids = batch["input_ids"][i : i + batch_size].to(device)
        labels = batch["labels"][i : i + batch_size].to(device)
        mask = (ids != tokenizer.pad_token_id).long()  # right padding; causal rows are unaffected
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V): tokens 1..T-1
        target = labels[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding; prompts of equal token length are batched together (no padding needed)."""
    device = next(model.parameters()).device
    by_len: dict[int, list[int]] = defaultdict(list)
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    out: list[str] = [""] * len(prompts)
    for idx in by_len.values():
        ids = torch.tensor([encoded[i] for i in idx], device=device)  # (B, T0)
        done = torch.zeros(len(idx), dtype=torch.bool, device=device)
        new = []
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, tokenizer.eos_token_id), nxt)
            new.append(nxt)
            done |= nxt == tokenizer.eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        gen = torch.stack(new, dim=1).tolist() if new else [[] for _ in idx]
        for row, i in zip(gen, idx):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def evaluate_domains(model, tokenizer, eval_sets: dict[str, list[Example]], seq_len: int) -> dict[str, dict[str, float]]:
    """{domain: {"loss": answer-token CE, "exact_match": share of exactly right greedy answers}}."""
    model.eval()
    results = {}
    for domain, examples in eval_sets.items():
        max_new = max(len(tokenizer.encode(e.answer, add_special_tokens=False)) for e in examples) + 1
        answers = greedy_answers(model, tokenizer, [e.prompt for e in examples], max_new)
        em = sum(a.strip() == e.answer for a, e in zip(answers, examples)) / len(examples)
        results[domain] = {"loss": domain_loss(model, tokenizer, examples, seq_len), "exact_match": em}
    return results
