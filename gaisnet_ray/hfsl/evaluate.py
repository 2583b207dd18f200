"""Held-out evaluation per domain: answer-token loss and greedy exact match.

Prompts are formatted as in training (``data.encode``: the chat template when the tokenizer has
one). Exact match decodes greedily with the model's own ``generate`` (KV cache), many prompts a
batch, left-padded with an attention mask, so a round's evaluation of a real model takes seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from ..data import Example, encode_examples, encode_prompt, left_padded_batches

GENERATE_BATCH = 32  # prompts per generate() call
LOSS_BATCH = 16  # rows per forward of the held-out loss: (B, T, V) logits, ~0.4 GB at SmolLM2's vocab


@torch.no_grad()
def domain_loss(model, tokenizer, examples: list[Example], seq_len: int, batch_size: int = LOSS_BATCH,
                system: str | None = None) -> float:
    """Mean cross-entropy over answer tokens (and eos), the same tokens training optimizes."""
    batch = encode_examples(examples, tokenizer, seq_len, system)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, batch["input_ids"].shape[0], batch_size):
        ids = batch["input_ids"][i : i + batch_size].to(device)
        labels = batch["labels"][i : i + batch_size].to(device)
        # right padding: causal rows are unaffected by what follows, so the mask is all ones (pad may
        # equal eos, which is a real token inside a row)
        logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V): predictions of tokens 1..T-1
        target = labels[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, system: str | None = None,
                   batch_size: int = GENERATE_BATCH) -> list[str]:
    """Greedy answers (up to eos or ``max_new_tokens``), batched and left-padded."""
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                               eos_token_id=eos, bos_token_id=tokenizer.bos_token_id)
    encoded = [encode_prompt(p, tokenizer, system) for p in prompts]
    out: list[str] = [""] * len(prompts)
    for idx, ids, mask in left_padded_batches(encoded, batch_size, pad):
        width = ids.shape[1]
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            if eos in new:
                new = new[: new.index(eos)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True)
    return out


def evaluate_domains(model, tokenizer, eval_sets: dict[str, list[Example]], seq_len: int,
                     system: str | None = None) -> dict[str, dict[str, float]]:
    """{domain: {"loss": answer-token CE, "exact_match": share of exactly right greedy answers}}."""
    model.eval()
    results = {}
    for domain, examples in eval_sets.items():
        max_new = max(len(tokenizer.encode(e.answer, add_special_tokens=False)) for e in examples) + 1
        answers = greedy_answers(model, tokenizer, [e.prompt for e in examples], max_new, system)
        em = sum(a.strip() == e.answer for a, e in zip(answers, examples)) / len(examples)
        results[domain] = {"loss": domain_loss(model, tokenizer, examples, seq_len, system=system),
                           "exact_match": em}
    return results
