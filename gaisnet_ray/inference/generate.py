"""Text generation with a KV cache, reporting the confidence signals the tier router uses.

One sequence at a time here; ``batch.py`` decodes several in one forward pass per step, through the
same ``RowDecoder``."""

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


@dataclass(frozen=True)
class Confidence:
    """The router's signals over the first ``tokens`` generated tokens (the tier router's probe)."""

    tokens: int
    mean_entropy: float
    min_token_prob: float


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

    def confidence(self) -> Confidence:
        return Confidence(len(self.entropies), self.mean_entropy, self.min_prob)


class RowDecoder:
    """One sequence's decoding state: sampling with its own generator, confidence, stop strings and
    the text released so far. Whole-model, split and batched generation all decode through it, so
    a row of a batch stops, samples and streams exactly as a request generated alone.

    ``step(logits)`` takes the next-token logits (V,) and returns the text deltas that became
    printable; after it, ``done`` says whether the row has finished, else ``out[-1]`` is the token
    to feed next. ``result()`` is the ``Generation`` once done. ``probe_tokens`` (k): the step that
    chose the k-th token also returns the ``Confidence`` of the first k tokens, last in its list
    (the tier router decides on it before the answer is complete).
    """

    def __init__(self, tokenizer, prompt_len: int, *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | tuple[str, ...] | None = None,
                 probe_tokens: int | None = None):
        self.probe_tokens = probe_tokens
        self.tokenizer, self.prompt_len, self.max_new_tokens = tokenizer, prompt_len, max_new_tokens
        self.temperature, self.top_p, self.stop = temperature, top_p, list(stop) if stop else None
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.stats = TokenStats()
        self.out: list[int] = []
        self.text, self.finish = "", "length"
        self.done = max_new_tokens <= 0

    def step(self, logits: torch.Tensor) -> list[str | Confidence]:
        token = choose_token(logits, self.temperature, self.top_p, self.gen)
        self.stats.add(logits, token)
        deltas = self._advance(token)
        if self.probe_tokens is not None and len(self.stats.entropies) == self.probe_tokens:
            deltas.append(self.stats.confidence())
        return deltas

    def _advance(self, token: int) -> list[str | Confidence]:
        if token == self.tokenizer.eos_token_id:
            self.finish, self.done = "stop", True
            return []
        self.out.append(token)
        full = self.tokenizer.decode(self.out, skip_special_tokens=True)
        deltas = []
        if self.stop and any(s in full for s in self.stop):
            cut = min(full.index(s) for s in self.stop if s in full)
            if cut > len(self.text):
                deltas.append(full[len(self.text):cut])
            self.text, self.finish, self.done = full[:cut], "stop", True
            return deltas
        last = len(self.out) >= self.max_new_tokens
        if last or not full.endswith("\ufffd"):  # hold back a partial UTF-8 character until the end
            if len(full) > len(self.text):
                deltas.append(full[len(self.text):])
            self.text = full
        self.done = last
        return deltas

    def result(self) -> Generation:
        return Generation(self.text, self.out, self.finish, self.prompt_len, len(self.out), self.stats.mean_entropy,
                          self.stats.min_prob)


def decode_loop(next_logits, prompt_ids: list[int], tokenizer, *, max_new_tokens: int, temperature: float,
                top_p: float, seed: int | None, stop: list[str] | None,
                probe_tokens: int | None = None) -> Iterator[str | Confidence | Generation]:
    """The one-sequence generation loop shared by whole-model and split inference.

    ``next_logits(new_ids)`` feeds the new token ids (the prompt first, then one token at a time)
    through a model that keeps its own KV cache and returns the last position's logits (V,).
    Yields text deltas as they become printable (and the probe's ``Confidence``, see ``RowDecoder``),
    then the ``Generation``.
    """
    row = RowDecoder(tokenizer, len(prompt_ids), max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed, stop=stop, probe_tokens=probe_tokens)
    if not row.done:
        logits = next_logits(prompt_ids)
        while True:
            yield from row.step(logits)
            if row.done:
                break
            logits = next_logits([row.out[-1]])
    yield row.result()


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

    def new_tokens_for(self, ids: list[int], max_new_tokens: int) -> int:
        """``max_new_tokens`` cut so that prompt + answer fit the model's context."""
        return max(0, min(max_new_tokens, self.max_context - len(ids)))

    def stream(self, prompt: str | list[int], *, max_new_tokens: int = 32, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
               chat: bool = True, probe_tokens: int | None = None) -> Iterator[str | Confidence | Generation]:
        """Text deltas, then the ``Generation``. ``prompt``: text (see ``encode_prompt``) or token ids."""
        if isinstance(prompt, str):
            ids = self.encode_prompt(prompt, chat)
        elif len(prompt) > self.max_prompt_tokens:
            raise PromptTooLongError(len(prompt), self.max_prompt_tokens)
        else:
            ids = list(prompt)
        max_new_tokens = self.new_tokens_for(ids, max_new_tokens)
        cache = DynamicCache(config=self.model.config)

        @torch.no_grad()
        def next_logits(new_ids: list[int]) -> torch.Tensor:
            x = torch.tensor([new_ids], device=self.device)
            return self.model(input_ids=x, cache=cache, use_cache=True).logits[0, -1]

        yield from decode_loop(next_logits, ids, self.tokenizer, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                               probe_tokens=probe_tokens)

    def generate(self, prompt: str | list[int], **kwargs) -> Generation:
        *_, result = self.stream(prompt, **kwargs)
        return result
