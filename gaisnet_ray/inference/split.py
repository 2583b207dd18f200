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


# Hidden-state dtypes a device may send (cast to the model's dtype on the edge).
HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest |value| accepted in a hidden state: real activations stay orders of magnitude below it,
# and a larger one would overflow the next layer norm's float32 variance into inf/NaN.
MAX_HIDDEN_ABS = 1e6


class HiddenStateError(ValueError):
    """A split payload the rest of the model must not run: ``code`` is bad_shape, bad_dtype or non_finite."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return (type(self), (self.code, str(self)))


def check_hidden(hidden: torch.Tensor, hidden_size: int) -> None:
    """Raise ``HiddenStateError`` unless ``hidden`` is a (1, T, hidden_size) hidden state with T >= 1,
    a float dtype of ``HIDDEN_DTYPES``, and finite values of magnitude at most ``MAX_HIDDEN_ABS``."""
    if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != hidden_size or hidden.shape[1] < 1:
        raise HiddenStateError("bad_shape", f"hidden state must be (1, T, {hidden_size}) with T >= 1; "
                                            f"got {tuple(hidden.shape)}")
    if hidden.dtype not in HIDDEN_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in HIDDEN_DTYPES)
        raise HiddenStateError("bad_dtype", f"hidden state must be one of {names}; got "
                                            f"{str(hidden.dtype).removeprefix('torch.')}")
    values = hidden.float()
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise HiddenStateError("non_finite", f"hidden state has {bad} NaN or infinite values")
    peak = float(values.abs().max())
    if peak > MAX_HIDDEN_ABS:
        raise HiddenStateError("non_finite", f"hidden state has a value of magnitude {peak:.3g}, over the "
                                             f"{MAX_HIDDEN_ABS:g} a hidden state can plausibly hold")


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
        check_hidden(hidden, self.split.lm.config.hidden_size)
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
                 stop: list[str] | None = None, chat: bool = True, system: str | None = None,
                 probe_tokens: int | None = None) -> Iterator[str | Generation]:
    """Generate with the front here and ``rest(hidden) -> logits`` wherever the edge is. ``prompt``:
    text (formatted by ``prompt_ids`` with ``chat``/``system``) or the prompt's token ids."""
    ids = list(prompt) if isinstance(prompt, list) else prompt_ids(prompt, tokenizer, chat, system)

    def next_logits(new_ids: list[int]) -> torch.Tensor:
        hidden = front.start(new_ids) if new_ids is ids else front.step(new_ids[0])
        return rest(hidden)

    yield from decode_loop(next_logits, ids, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed, stop=stop, probe_tokens=probe_tokens)
