"""Turn examples into fixed-length causal-LM rows, formatted as the model expects.

A tokenizer with a chat template (an instruction-tuned model such as SmolLM2-Instruct) gets each
prompt as a user turn, rendered by its own template with the generation prompt appended, and
learns the answer as the assistant turn (the answer tokens and the template's end-of-turn token,
which such tokenizers use as eos). A tokenizer without one (the offline byte-level tokenizer of
the tiny presets) gets ``[bos] prompt``. Row layout (T = seq_len)::

    input_ids: prompt_ids      answer_ids [eos] [pad] ...
    labels:    -100 ... -100   answer_ids  eos  -100  ...

where ``prompt_ids`` is ``encode_prompt(prompt)``. Loss is only on the answer and its eos.
Labels sit at the same positions as input_ids; the model shifts them (Hugging Face convention).
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import torch

from gaisnet_ray.data.domains import Example
from gaisnet_ray.data.jsonl import DatasetError

__all__ = ["IGNORE_INDEX", "Tokenizer", "encode_examples", "encode_prompt", "encode_text", "has_chat_template"]

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


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversation a prompt becomes: an optional system turn, then the user turn."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def encode_prompt(prompt: str, tokenizer: Tokenizer, system: str | None = None) -> list[int]:
    """The tokens generation starts from: the chat template's rendering of ``prompt`` as a user turn
    (``system``: an optional system turn before it; None keeps the template's own default), with the
    assistant's turn opened; without a template, ``[bos] + prompt_ids``."""
    if has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(chat_messages(prompt, system), add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return [int(i) for i in (ids["input_ids"] if isinstance(ids, dict) else ids)]
    return [_special(tokenizer, "bos")] + list(tokenizer.encode(prompt, add_special_tokens=False))


def encode_text(text: str, tokenizer: Tokenizer) -> list[int]:
    """Raw text as the model reads a completion prompt: a chat-template model gets it as is (its
    text carries the template's own markers, if any); otherwise ``[bos] + text_ids``."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids if has_chat_template(tokenizer) else [_special(tokenizer, "bos")] + ids


def encode_examples(
    examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int, system: str | None = None
) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}``, each a LongTensor (N, seq_len); loss only on answer + eos."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos, pad = _special(tokenizer, "eos"), _special(tokenizer, "pad")
    input_ids = torch.full((len(examples), seq_len), pad, dtype=torch.long)  # (N, T)
    labels = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    for i, ex in enumerate(examples):
        prompt = encode_prompt(ex.prompt, tokenizer, system)
        target = list(tokenizer.encode(ex.answer, add_special_tokens=False)) + [eos]
        n = len(prompt) + len(target)
        if n > seq_len:
            raise DatasetError(
                f"example with prompt {ex.prompt!r} needs {n} tokens "
                f"({len(prompt)} prompt, {len(target)} answer+eos) but seq_len is {seq_len}: "
                f"raise model.max_seq_len"
            )
        input_ids[i, :n] = torch.tensor(prompt + target, dtype=torch.long)
        labels[i, len(prompt) : n] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def lengths_of(labels: torch.Tensor) -> torch.Tensor:
    """(N, T) labels of ``encode_examples`` (answer + eos supervised, -100 on the prompt and the
    padding after) -> (N,) real tokens in each sequence."""
    t = torch.arange(labels.shape[1]).expand_as(labels)
    return torch.where(labels != -100, t + 1, torch.zeros_like(t)).max(dim=1).values


def left_padded_batches(encoded: Sequence[list[int]], batch_size: int,
                        pad: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Prompts for batched ``model.generate``: (indices into ``encoded``, ids (B, T0) left-padded with
    ``pad``, attention mask), batches of similar lengths (sorted by length, so they pad less)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i])
            ids[row, width - n:] = torch.tensor(encoded[i])
            mask[row, width - n:] = 1
        yield idx, ids, mask
