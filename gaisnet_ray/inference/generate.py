"""Text generation with a KV cache, reporting the confidence signals the tier router uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import DynamicCache

from ..data.encode import encode_prompt, encode_text


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    mean_entropy: float  # mean over generated tokens of the next-token distribution's entropy (nats)
    min_token_prob: float  # lowest probability the model gave a token it emitted


class PromptTooLongError(ValueError):
    def __init__(self, prompt_tokens: int, limit: int):
        super().__init__(f"prompt has {prompt_tokens} tokens; the limit is {limit}")
        self.prompt_tokens, self.limit = prompt_tokens, limit

    def __reduce__(self):
        return (type(self), (self.prompt_tokens, self.limit))


def prompt_ids(prompt: str, tokenizer, chat: bool = True, system: str | None = None) -> list[int]:
    """The tokens generation starts from. ``chat``: ``prompt`` is a user turn, formatted as in
    training (``data.encode.encode_prompt``: the chat template when the tokenizer has one);
    otherwise raw text (an OpenAI completion prompt, or a conversation already rendered by the
    template). For a tokenizer without a chat template both are ``[bos] + prompt``."""
    return encode_prompt(prompt, tokenizer, system) if chat else encode_text(prompt, tokenizer)


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling. ``logits``: (V,)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float()
    # The max subtracted first: the same distribution, and a tiny temperature cannot overflow to inf/NaN.
    probs = torch.softmax((logits - logits.max()).double() / temperature, dim=-1).float()
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        keep[0] = True  # the most likely token, also when top_p is below float32's smallest value
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


class TokenStats:
    """Running confidence of a generation: entropy of each step's distribution, chosen-token prob."""

    def __init__(self):
        self.entropies: list[float] = []
        self.min_prob = 1.0

    def add(self, logits: torch.Tensor, token: int) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.entropies.append(float(-(logp.exp() * logp).sum()))
        self.min_prob = min(self.min_prob, float(logp[token].exp()))

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropies) / len(self.entropies) if self.entropies else 0.0


def decode_loop(next_logits, prompt_ids: list[int], tokenizer, *, max_new_tokens: int, temperature: float,
                top_p: float, seed: int | None, stop: list[str] | None) -> Iterator[str | Generation]:
    """The generation loop shared by whole-model and split inference.

    ``next_logits(new_ids)`` feeds the new token ids (the prompt first, then one token at a time)
    through a model that keeps its own KV cache and returns the last position's logits (V,).
    Yields text deltas as they become printable, then the ``Generation``.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    stats = TokenStats()
    out: list[int] = []
    text, finish = "", "length"
    logits = next_logits(prompt_ids)
    for _ in range(max_new_tokens):
        token = choose_token(logits, temperature, top_p, gen)
        stats.add(logits, token)
        if token == tokenizer.eos_token_id:
            finish = "stop"
            break
        out.append(token)
        full = tokenizer.decode(out, skip_special_tokens=True)
        if stop and any(s in full for s in stop):
            cut = min(full.index(s) for s in stop if s in full)
            if cut > len(text):
                yield full[len(text):cut]
            text, finish = full[:cut], "stop"
            break
        if not full.endswith("\ufffd"):  # hold back a partial UTF-8 character
            if len(full) > len(text):
                yield full[len(text):]
            text = full
        logits = next_logits([token])
    else:
        full = tokenizer.decode(out, skip_special_tokens=True)
        if len(full) > len(text):
            yield full[len(text):]
        text = full
    yield Generation(text, out, finish, len(prompt_ids), len(out), stats.mean_entropy, stats.min_prob)


class CausalGenerator:
    """A causal LM (plain or peft) and its tokenizer, generating with a KV cache."""

    def __init__(self, model, tokenizer, max_prompt_tokens: int, max_context: int, system: str | None = None):
        """``system``: the system turn chat-formatted prompts get (the run's ``data.system_prompt``)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_prompt_tokens, self.max_context = max_prompt_tokens, max_context
        self.system = system
        self.device = next(model.parameters()).device

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """``chat``: ``prompt`` is a user turn, formatted as in training (the chat template when the
        tokenizer has one); otherwise raw text (a completion prompt, or an already rendered chat)."""
        ids = prompt_ids(prompt, self.tokenizer, chat, self.system)
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.max_prompt_tokens)
        return ids

    def stream(self, prompt: str, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None, chat: bool = True) -> Iterator[str | Generation]:
        ids = self.encode_prompt(prompt, chat)
        max_new_tokens = max(0, min(max_new_tokens, self.max_context - len(ids)))
        cache = DynamicCache(config=self.model.config)

        @torch.no_grad()
        def next_logits(new_ids: list[int]) -> torch.Tensor:
            x = torch.tensor([new_ids], device=self.device)
            return self.model(input_ids=x, cache=cache, use_cache=True).logits[0, -1]

        yield from decode_loop(next_logits, ids, self.tokenizer, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, stop=stop)

    def generate(self, prompt: str, **kwargs) -> Generation:
        *_, result = self.stream(prompt, **kwargs)
        return result
