"""Cloud pre-training of the foundation model on public data, before the first round.

Full-parameter AdamW in plain torch on the cloud's public examples: the foundation the devices'
adapters then specialise. (The DeepSpeed engine for large cloud models replaces this loop when the
cloud tier moves to DeepSpeed; the call site stays the same.)
"""

from __future__ import annotations

import torch

from ..data import Example, encode_examples


def pretrain_foundation(model, tokenizer, examples: list[Example], *, steps: int, lr: float, batch_size: int,
                        seq_len: int, seed: int) -> list[float]:
    """Train every parameter of ``model`` for ``steps`` steps; returns the loss per step."""
    if steps <= 0 or not examples:
        return []
    batch = encode_examples(examples, tokenizer, seq_len)
    n = batch["input_ids"].shape[0]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        loss = model(input_ids=batch["input_ids"][idx].to(device), labels=batch["labels"][idx].to(device)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses
