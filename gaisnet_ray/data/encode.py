"""Turn examples into fixed-length causal-LM rows.

Row layout (T = seq_len)::

    input_ids: [bos] prompt_ids answer_ids [eos] [pad] ...
    labels:    -100  -100...    answer_ids  eos  -100  ...

Labels sit at the same positions as input_ids; the model shifts them (Hugging Face convention).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from gaisnet_ray.data.domains import Example
from gaisnet_ray.data.jsonl import DatasetError

__all__ = ["IGNORE_INDEX", "Tokenizer", "encode_examples", "encode_prompt"]

IGNORE_INDEX = -100  # label value the loss skips


class Tokenizer(Protocol):
    """What encoding needs; a Hugging Face ``PreTrainedTokenizerFast`` satisfies it."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def _special(tokenizer: Tokenizer, name: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise DatasetError(f"tokenizer has no {name}_token_id; set one before encoding")
    return int(value)


def encode_prompt(prompt: str, tokenizer: Tokenizer) -> list[int]:
    """``[bos] + prompt_ids``: the tokens generation starts from."""
    return [_special(tokenizer, "bos")] + list(tokenizer.encode(prompt, add_special_tokens=False))


def encode_examples(
    examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int
) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}``, each a LongTensor (N, seq_len); loss only on answer + eos."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos, pad = _special(tokenizer, "eos"), _special(tokenizer, "pad")
    input_ids = torch.full((len(examples), seq_len), pad, dtype=torch.long)  # (N, T)
    labels = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    for i, ex in enumerate(examples):
        prompt = encode_prompt(ex.prompt, tokenizer)
        target = list(tokenizer.encode(ex.answer, add_special_tokens=False)) + [eos]
        n = len(prompt) + len(target)
        if n > seq_len:
            raise DatasetError(
                f"example with prompt {ex.prompt!r} needs {n} tokens "
                f"({len(prompt)} bos+prompt, {len(target)} answer+eos) but seq_len is {seq_len}"
            )
        input_ids[i, :n] = torch.tensor(prompt + target, dtype=torch.long)
        labels[i, len(prompt) : n] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}
