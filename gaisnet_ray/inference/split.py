"""Split inference: the device runs the front segment, the edge runs the rest; each side keeps
its own KV cache, so generating n tokens costs O(n) segment steps, not O(n^2)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator

import torch
from transformers import DynamicCache

from ..models.split import SplitModel
from .generate import Generation, decode_loop, prompt_ids


class FrontRunner:
    """Device side: embeddings + blocks[0:front_end] with a KV cache for one generation."""

    def __init__(self, split: SplitModel, front_end: int):
        self.split, self.front_end = split, front_end
        self.device = next(split.peft.parameters()).device
        self._cache: DynamicCache | None = None
        self._past = 0

    @torch.no_grad()
    def start(self, prompt_ids: list[int]) -> torch.Tensor:
        """New generation: the prompt's hidden state (1, T, H)."""
        self._cache, self._past = DynamicCache(config=self.split.lm.config), 0
        return self._run(prompt_ids)

    @torch.no_grad()
    def step(self, token_id: int) -> torch.Tensor:
        """The next token's hidden state (1, 1, H), reusing the cache."""
        if self._cache is None:
            raise RuntimeError("FrontRunner.step before start")
        return self._run([token_id])

    def _run(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)
        h = self.split.front(x, self.front_end, cache=self._cache, past_len=self._past)
        self._past += len(ids)
        return h


class UnknownSessionError(KeyError):
    pass


class RestRunner:
    """Edge side: blocks[front_end:L] + final norm + LM head, one KV cache per session (LRU)."""

    def __init__(self, split: SplitModel, front_end: int, max_sessions: int = 256):
        self.split, self.front_end, self.max_sessions = split, front_end, max_sessions
        self.device = next(split.peft.parameters()).device
        self._sessions: OrderedDict[str, tuple[DynamicCache, int]] = OrderedDict()

    @torch.no_grad()
    def forward(self, session_id: str, hidden: torch.Tensor, past_len: int | None = None) -> torch.Tensor:
        """Hidden state (1, T, H) of the session's next tokens -> last position's logits (V,).

        ``past_len`` (what the caller believes is cached) is checked when given, so a client
        and the edge can never silently disagree about positions.
        """
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != self.split.lm.config.hidden_size:
            raise ValueError(f"hidden state must be (1, T, {self.split.lm.config.hidden_size}), got {tuple(hidden.shape)}")
        if session_id in self._sessions:
            cache, past = self._sessions.pop(session_id)
        else:
            cache, past = DynamicCache(config=self.split.lm.config), 0
        if past_len is not None and past_len != past:
            raise ValueError(f"session '{session_id}': client says {past_len} tokens are cached, edge has {past}")
        logits = self.split.back(hidden.to(self.device, self.split.lm.dtype), self.front_end, cache=cache, past_len=past)
        self._sessions[session_id] = (cache, past + hidden.shape[1])
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return logits[0, -1]

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def split_stream(front: FrontRunner, rest: Callable[[torch.Tensor], torch.Tensor], tokenizer, prompt: str | list[int],
                 *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, chat: bool = True,
                 system: str | None = None) -> Iterator[str | Generation]:
    """Generate with the front here and ``rest(hidden) -> logits`` wherever the edge is. ``prompt``:
    text (formatted by ``prompt_ids`` with ``chat``/``system``) or the prompt's token ids."""
    ids = list(prompt) if isinstance(prompt, list) else prompt_ids(prompt, tokenizer, chat, system)

    def next_logits(new_ids: list[int]) -> torch.Tensor:
        hidden = front.start(new_ids) if new_ids is ids else front.step(new_ids[0])
        return rest(hidden)

    yield from decode_loop(next_logits, ids, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, stop=stop)
