"""The HTTP API's request bodies and response shapes (pydantic, no Ray, no FastAPI app here).

Two families:
- OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``: fields OpenAI clients send;
  unknown fields are ignored as OpenAI does, fields this server cannot honour (``n > 1``, ``echo``,
  ``logprobs``, ``best_of``, ``suffix``) are rejected naming the field. Two extensions, sent by
  OpenAI clients with ``extra_body``: ``tier`` (hint: edge | cloud | end) and ``domain``.
- Native ``/v1/generate``: a strict body (unknown fields are errors) whose answer says which tier
  served it, why, and with which knowledge version.

Every answer carries a ``gaisnet`` object (tier, reason, escalated, adapter, version, domain,
confidence); OpenAI answers also carry it as ``x-gaisnet-*`` headers.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..inference.generate import Generation
from ..inference.routing import RouteDecision
from .errors import ServeError
from .slots import TierAnswer

TierName = Literal["edge", "cloud", "end"]
ROUTER_MODEL = "gaisnet"  # the tiered model: edge first, escalates to the cloud when not confident
DOMAIN_PREFIX = "gaisnet:"  # "gaisnet:<domain>": tiered, with the domain given instead of inferred
# Every numeric field is range-checked here, at the API boundary (422 naming the field): a seed is a
# signed 64-bit integer (OpenAI's range; torch's generator takes it), at most 4 stop strings (OpenAI's).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_STOP = 4
Seed = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Sampling seed, a signed 64-bit integer.")
Stop = Field(None, description=f"Up to {MAX_STOP} strings that end the generation.")


# ------------------------------------------------------------------------------------- requests
class GenerateBody(BaseModel):
    """POST /v1/generate."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    tier: TierName | None = Field(None, description="Force a tier; omitted: the edge answers, low confidence escalates.")
    domain: str | None = Field(None, description="The prompt's domain; omitted: inferred from its shape.")
    adapter: str | None = Field(None, description="Pin an edge adapter ('base', 'global', 'edge-0', ...); no escalation.")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Seed
    stop: str | list[str] | None = Stop


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = Stop
    seed: int | None = Seed
    tier: TierName | None = None
    domain: str | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise ServeError(400, "unsupported_value", f"n={self.n} is not supported: this server returns one choice", "n")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_OpenAIBody):
    """POST /v1/completions."""

    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def prompt_text(self) -> str:
        self.check_supported()
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name) not in (None, False):
                raise ServeError(400, "unsupported_value", f"'{name}' is not supported by this server", name)
        if self.best_of not in (None, 1):
            raise ServeError(400, "unsupported_value", f"best_of={self.best_of} is not supported", "best_of")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ServeError(400, "unsupported_value",
                                 f"prompt must be one string (got a list of {len(self.prompt)})", "prompt")
            text = self.prompt[0]
        else:
            text = self.prompt
        if not text:
            raise ServeError(422, "invalid_field", "field 'prompt': must not be empty", "prompt")
        return text


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatBody(_OpenAIBody):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    def prompt_text(self, tokenizer, system: str | None = None) -> str:
        """The prompt the model sees: the tokenizer's chat template when it has one; otherwise the
        messages' texts joined by newlines (the built-in models were trained on bare prompts).
        ``system``: the run's ``data.system_prompt``, the system turn the model was trained with; a
        conversation without a system message of its own gets it (as ``/v1/generate`` prompts do)."""
        self.check_supported()
        if self.logprobs:
            raise ServeError(400, "unsupported_value", "'logprobs' is not supported by this server", "logprobs")
        if getattr(tokenizer, "chat_template", None):
            msgs = [{"role": m.role, "content": m.text()} for m in self.messages]
            if system and not any(m.role in ("system", "developer") for m in self.messages):
                msgs.insert(0, {"role": "system", "content": system})
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        text = "\n".join(t for t in (m.text() for m in self.messages) if t)
        if not text:
            raise ServeError(422, "invalid_field", "field 'messages': every message is empty", "messages")
        return text

    def last_user_text(self) -> str:
        """The last user message (what the prompt's domain is inferred from)."""
        users = [m.text() for m in self.messages if m.role == "user"]
        return users[-1] if users else ""

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def stop_list(stop: str | list[str] | None) -> tuple[str, ...] | None:
    if stop is None:
        return None
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(items) > MAX_STOP:
        raise ServeError(422, "invalid_field", f"field 'stop': at most {MAX_STOP} stop strings (got {len(items)})", "stop")
    if any(not s for s in items):
        raise ServeError(422, "invalid_field", "field 'stop': stop strings must not be empty", "stop")
    return items or None


# ------------------------------------------------------------------------------------ answers
@dataclass
class RoutedAnswer:
    """The final answer of a routed request and how it came about."""

    answer: TierAnswer
    decision: RouteDecision
    domain: str | None
    edge_attempt: TierAnswer | None = None  # the edge answer that was escalated (or kept on overload)

    def gaisnet(self) -> dict:
        g = self.answer.generation
        out = {
            "tier": self.answer.tier,
            "reason": self.decision.reason,
            "escalated": self.decision.escalated,
            "adapter": self.answer.adapter,
            "version": self.answer.version,
            "domain": self.domain,
            "confidence": confidence(g),
            "latency_s": {self.answer.tier: round(self.answer.elapsed_s, 6)},
            "edge_attempt": None,
        }
        if self.edge_attempt is not None:
            e = self.edge_attempt
            out["edge_attempt"] = {"adapter": e.adapter, "version": e.version, "text": e.generation.text,
                                   "confidence": confidence(e.generation)}
            out["latency_s"]["edge"] = round(e.elapsed_s, 6)
        return out

    def headers(self) -> dict[str, str]:
        return tier_headers(self.answer.tier, self.answer.adapter, self.answer.version, self.decision)


def tier_headers(tier: str, adapter: str, version: int | None, decision: RouteDecision) -> dict[str, str]:
    return {"x-gaisnet-tier": tier, "x-gaisnet-adapter": adapter,
            "x-gaisnet-version": "" if version is None else str(version),
            "x-gaisnet-escalated": str(decision.escalated).lower(),
            "x-gaisnet-reason": decision.reason.encode("ascii", "replace").decode()}


def confidence(g: Generation) -> dict:
    return {"mean_entropy": round(g.mean_entropy, 6), "min_token_prob": round(g.min_token_prob, 6)}


def usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def generate_response(r: RoutedAnswer) -> dict:
    g = r.answer.generation
    return {"text": g.text, "finish_reason": g.finish_reason, "usage": usage(g), **r.gaisnet()}


class OpenAIShape:
    """Builds completion / chat responses and stream chunks with one id and timestamp per request."""

    def __init__(self, kind: Literal["completion", "chat"], model: str):
        self.kind, self.model = kind, model
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, r: RoutedAnswer) -> dict:
        g = r.answer.generation
        if self.kind == "completion":
            choice = {"index": 0, "text": g.text, "finish_reason": g.finish_reason, "logprobs": None}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": g.text},
                      "finish_reason": g.finish_reason, "logprobs": None}
            obj = "chat.completion"
        return {**self._envelope(obj), "choices": [choice], "usage": usage(g), "gaisnet": r.gaisnet()}

    def chunk(self, delta: str | None, *, first: bool = False, finish_reason: str | None = None,
              gaisnet: dict | None = None) -> dict:
        if self.kind == "completion":
            choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
            out = {**self._envelope("text_completion"), "choices": [choice]}
        else:
            d: dict = {}
            if first:
                d["role"] = "assistant"
            if delta:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "finish_reason": finish_reason, "logprobs": None}
            out = {**self._envelope("chat.completion.chunk"), "choices": [choice]}
        if gaisnet is not None:
            out["gaisnet"] = gaisnet
        return out

    def usage_chunk(self, g: Generation) -> dict:
        obj = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {**self._envelope(obj), "choices": [], "usage": usage(g)}


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
