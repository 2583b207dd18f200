"""What a tier replica holds, without Ray: loaded model versions and hot-swappable slots.

A ``ServedModel`` is one adapter at one knowledge version, loaded once and never mutated. A
``ModelSlot`` points at the current ``ServedModel`` of one adapter; ``refresh`` loads a newer
version next to it and then swaps the reference in one assignment. A request reads
``slot.current`` once and uses that object to the end, so a swap never changes the model under a
running request, and no request waits for a load.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..inference.batch import BatchRow
from ..inference.generate import CausalGenerator, Generation, PromptTooLongError
from ..inference.served import ServedRun
from ..inference.split import RestRunner
from ..models.split import SplitModel
from .errors import ServeError, prompt_too_long

BASE = "base"  # the foundation model with no adapter (served by the edge tier)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """What a tier needs to answer: the prompt and the decoding parameters (already validated)."""

    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    chat: bool = True  # prompt is a user turn (chat template, as in training); False: raw text
    route_text: str | None = None  # what domain inference reads (the last user message); None: prompt
    probe_tokens: int | None = None  # the stream carries the Confidence of the first k tokens (the router's probe)

    def decode_kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": list(self.stop) if self.stop else None, "chat": self.chat,
                "probe_tokens": self.probe_tokens}


@dataclass
class TierAnswer:
    """A tier's answer: which tier, adapter and knowledge version produced the generation."""

    tier: str
    adapter: str
    version: int | None
    generation: Generation
    elapsed_s: float


@dataclass(frozen=True)
class StreamStart:
    """First item of a tier's stream, sent once the prompt is accepted: who is answering."""

    tier: str
    adapter: str
    version: int | None


def max_context_of(model_config) -> int:
    """Positions the model can attend over (GPT-2: n_positions; Llama: max_position_embeddings)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of model type '{model_config.model_type}'")


@dataclass
class ServedModel:
    """One adapter at one version, ready to generate; built once, then only read."""

    adapter: str
    version: int | None
    model: object  # PeftModel (adapters) or a plain causal LM (base)
    generator: CausalGenerator
    max_context: int
    loaded_at: float = field(default_factory=time.time)
    _split: SplitModel | None = field(default=None, repr=False)
    _rest: RestRunner | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def generate(self, tier: str, req: GenerationRequest) -> TierAnswer:
        started = time.perf_counter()
        try:
            gen = self.generator.generate(req.prompt, **req.decode_kwargs())
        except PromptTooLongError as e:
            raise prompt_too_long(e.prompt_tokens, e.limit) from None
        return TierAnswer(tier, self.adapter, self.version, gen, time.perf_counter() - started)

    def batch_row(self, req: GenerationRequest) -> BatchRow:
        """``req`` as a row of a batch: its prompt's tokens (checked against the limit) and settings."""
        try:
            ids = self.generator.encode_prompt(req.prompt, req.chat)
        except PromptTooLongError as e:
            raise prompt_too_long(e.prompt_tokens, e.limit) from None
        return BatchRow(tuple(ids), self.generator.new_tokens_for(ids, req.max_new_tokens), req.temperature,
                        req.top_p, req.seed, req.stop, req.probe_tokens, cancel=threading.Event())

    def split_model(self) -> SplitModel:
        """The model as segments (for split inference); the base model has no adapter to split."""
        with self._lock:
            if self._split is None:
                if self.adapter == BASE:
                    raise ServeError(422, "split_needs_adapter",
                                     "split inference runs an adapter ('global' or an edge's), not 'base'", "adapter")
                self._split = SplitModel(self.model)
            return self._split

    def rest_runner(self, front_end: int, max_sessions: int = 256) -> RestRunner:
        split = self.split_model()
        if not 1 <= front_end < split.num_layers:
            raise ServeError(500, "bad_split_config", f"serve.split_front_layers={front_end} leaves no block for the "
                                                      f"edge: the model has {split.num_layers} blocks")
        with self._lock:
            if self._rest is None:
                self._rest = RestRunner(split, front_end, max_sessions=max_sessions)
            return self._rest


def load_served(run: ServedRun, adapter: str, version: int | None, *, max_prompt_tokens: int | None,
                torch_device: str = "cpu") -> ServedModel:
    """Load ``adapter`` (``base``, ``global`` or an edge id) at ``version`` (None: latest)."""
    if adapter == BASE:  # versioned when a relay updates the base (None: one fixed base)
        version = run.latest_base_version() if version is None else version
        model = run.load_base(run.base_dir(version))
    else:
        model, version = run.load_model(adapter, version)
    model.to(torch_device)
    max_context = max_context_of(model.config)
    limit = min(max_prompt_tokens or max_context - 1, max_context - 1)
    generator = CausalGenerator(model, run.tokenizer, max_prompt_tokens=limit, max_context=max_context,
                                system=run.system_prompt)
    return ServedModel(adapter, version, model, generator, max_context)


def latest_of(run: ServedRun, adapter: str) -> int | None:
    """Newest intact version of an adapter (a damaged newer one is skipped and logged, never served);
    for the base model, its newest base version (None when the run has one fixed base)."""
    if adapter == BASE:
        return run.latest_base_version()
    return run.intact_version(adapter)[0]


class ModelSlot:
    """The current version of one adapter; ``refresh`` swaps in a newer one atomically."""

    def __init__(self, adapter: str, load: Callable[[str, int | None], ServedModel],
                 latest: Callable[[str], int | None]):
        self.adapter, self._load, self._latest = adapter, load, latest
        self.current: ServedModel = load(adapter, None)
        self.swaps = 0

    def refresh(self) -> bool:
        """Load the latest version if it is newer than the served one; True when swapped.

        Blocking (loads a model): call it off the event loop. The old model stays in use by the
        requests that hold it and is freed when they finish.
        """
        latest = self._latest(self.adapter)
        if latest is None or self.current.version is None or latest <= self.current.version:
            return False
        old, fresh = self.current.version, self._load(self.adapter, latest)
        self.current = fresh  # one reference assignment: requests see the old or the new, never half
        self.swaps += 1
        log.info("hot swap: %s v%s -> v%s", self.adapter, old, fresh.version)
        return True


async def poll_versions(slots: Callable[[], list[ModelSlot]], interval_s: float, state: dict,
                        on_swap: Callable[[ModelSlot], None] | None = None,
                        on_tick: Callable[[], None] | None = None) -> None:
    """Forever: every ``interval_s`` refresh each slot in a worker thread (the loop keeps serving).

    A failed refresh (say, a version folder that cannot be read) is recorded in ``state['error']``
    and retried on the next tick; the served version stays the previous one. A version that fails
    verification is never a refresh candidate (``latest_of`` skips it).
    """
    while True:
        await asyncio.sleep(interval_s)
        errors = []
        for slot in slots():
            try:
                swapped = await asyncio.to_thread(slot.refresh)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                errors.append(f"refreshing '{slot.adapter}' failed: {type(e).__name__}: {e}")
                log.warning(errors[-1])
                continue
            if swapped and on_swap is not None:
                on_swap(slot)
        state["error"] = "; ".join(errors) or None
        state["last_poll"] = time.time()
        if on_tick is not None:
            on_tick()


__all__ = ["BASE", "GenerationRequest", "ModelSlot", "ServedModel", "StreamStart", "TierAnswer", "load_served",
           "latest_of", "max_context_of", "poll_versions"]
