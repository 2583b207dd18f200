"""The edge tier: the base model plus every adapter the run relayed (global, one per edge), loaded
per request with ``serve.multiplexed`` keyed by adapter name, and the rest of a split model for
split inference (one KV cache per session).

Callers pick the adapter with ``handle.options(multiplexed_model_id="edge-0")``; Serve routes the
request to a replica that already holds it when there is one.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from ray import serve

from ..config import ServeSettings
from ..inference.codec import tensor_from_bytes, tensor_to_bytes
from ..inference.served import GLOBAL, UnknownAdapterError
from ..inference.split import HiddenStateError, RestRunner, check_hidden
from ..knowledge.errors import KnowledgeError
from .errors import ServeError, unknown_model
from .escalations import EscalationLearner, EscalationRecord
from .replica import TierReplica, front_layers_for
from .slots import BASE, GenerationRequest, ModelSlot, ServedModel, TierAnswer

# Adapters one edge replica keeps loaded (LRU beyond this). A class-level constant because
# serve.multiplexed takes it at class definition.
EDGE_MAX_ADAPTERS = 8
# Older versions kept for split sessions whose device front runs a version the slot moved past.
PINNED_VERSIONS = 2


@dataclass
class SplitSession:
    """A device's split generation as the edge holds it: the runner (with its KV cache) it started on."""

    served: ServedModel
    runner: RestRunner
    past_len: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


@serve.deployment(name="edge")
class EdgeTier(TierReplica):
    tier = "edge"

    def __init__(self, run_dir: str, settings: dict):
        super().__init__(run_dir, settings, ServeSettings.model_validate(settings).edge)
        self.front_end = front_layers_for(run_dir, self.settings)
        self._slots: weakref.WeakValueDictionary[str, ModelSlot] = weakref.WeakValueDictionary()
        self._pinned: OrderedDict[tuple[str, int], ServedModel] = OrderedDict()
        self._sessions: OrderedDict[str, SplitSession] = OrderedDict()  # least recently used first
        self.evicted = 0
        self._lock = threading.Lock()
        # serve.learn_from_escalations: what this edge escalated, kept on its node, distilled between rounds
        self.learner = (EscalationLearner(run_dir, self.settings, self.run.tokenizer, self.run.system_prompt)
                        if self.settings.learn_from_escalations else None)
        self.start_polling()

    # ------------------------------------------------------------------------------ adapters
    def known_adapters(self) -> list[str]:
        return [BASE, *self.run.adapter_names()]

    @serve.multiplexed(max_num_models_per_replica=EDGE_MAX_ADAPTERS)
    async def slot(self, adapter: str) -> ModelSlot:
        if adapter not in self.known_adapters():
            raise unknown_model(adapter, self.known_adapters())
        slot = await asyncio.to_thread(self.new_slot, adapter)
        self._slots[adapter] = slot
        return slot

    async def current(self) -> ServedModel:
        return (await self.slot(serve.get_multiplexed_model_id() or GLOBAL)).current

    def slots(self) -> list[ModelSlot]:
        return list(self._slots.values())

    # ---------------------------------------------------------------------------- generation
    async def generate(self, req: GenerationRequest) -> TierAnswer:
        return await self.answer(await self.current(), req)

    async def stream(self, req: GenerationRequest):
        served = await self.current()
        async for item in self.answer_stream(served, req):
            yield item

    async def record_escalation(self, record: EscalationRecord) -> bool:
        """Keep an escalation of one of the edges' adapters with the cloud's answer (the router's
        ``escalations.hand_back``); False when learning is off or the record is not kept."""
        if self.learner is None or record.edge not in self.known_adapters():
            return False
        return await asyncio.to_thread(self.learner.record, record)

    # ----------------------------------------------------------------------- split inference
    async def split_forward(self, session_id: str, past_len: int, version: int | None, payload: bytes,
                            want: str) -> dict:
        """One split step: the device's hidden state (1, T, H) as safetensors bytes -> the last
        position's logits (safetensors bytes) or the greedy token. ``version`` is the knowledge
        version the device's front runs (None: the edge's current one)."""
        slot = await self.slot(serve.get_multiplexed_model_id() or GLOBAL)
        return await asyncio.to_thread(self._split_step, slot, session_id, past_len, version, payload, want)

    def _served_at(self, slot: ModelSlot, version: int | None) -> ServedModel:
        current = slot.current
        if version is None or version == current.version:
            return current
        key = (slot.adapter, version)
        with self._lock:
            if key in self._pinned:
                self._pinned.move_to_end(key)
                return self._pinned[key]
        try:
            served = self.load(slot.adapter, version)
        except (KnowledgeError, UnknownAdapterError, FileNotFoundError) as e:
            have = self.run.adapter_store(slot.adapter).versions()
            why = str(e) if version in have else f"adapter '{slot.adapter}' has no version {version} (have {have})"
            raise ServeError(404, "unknown_version", self.run.redact(why), "x-gaisnet-version") from None
        with self._lock:
            self._pinned[key] = served
            while len(self._pinned) > PINNED_VERSIONS:
                self._pinned.popitem(last=False)
        return served

    def _split_step(self, slot: ModelSlot, session_id: str, past_len: int, version: int | None, payload: bytes,
                    want: str) -> dict:
        try:
            hidden = tensor_from_bytes(payload)  # (1, T, H)
        except ValueError as e:
            raise ServeError(400, "bad_payload", f"activation payload: {e}", "body") from None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)
        if session is None:
            if past_len != 0:
                raise ServeError(409, "unknown_session",
                                 f"split session '{session_id}' is not open on this edge (never started, closed, "
                                 f"idle past {self.settings.split_session_ttl_s:g} s, or evicted as the longest idle "
                                 f"of more than {self.settings.max_split_sessions}); start again with past_len 0",
                                 "x-gaisnet-session")
            served = self._served_at(slot, version)
        elif version is not None and version != session.served.version:
            raise ServeError(409, "version_mismatch",
                             f"split session '{session_id}' runs version {session.served.version}, the request says "
                             f"{version}", "x-gaisnet-version")
        else:
            served = session.served
        try:
            check_hidden(hidden, served.model.config.hidden_size)
        except HiddenStateError as e:
            raise ServeError(422, e.code, str(e), "body") from None
        if past_len + hidden.shape[1] > served.max_context:
            raise ServeError(413, "context_exceeded",
                             f"session would hold {past_len + hidden.shape[1]} positions; the model's context is "
                             f"{served.max_context}", "x-gaisnet-past-len")
        if session is None:  # a valid first step opens the session (evicting the longest idle at the cap)
            session = SplitSession(served, served.rest_runner(self.front_end, self.settings.max_split_sessions))
            with self._lock:
                session = self._sessions.setdefault(session_id, session)
                while len(self._sessions) > self.settings.max_split_sessions:
                    old_id, old = self._sessions.popitem(last=False)
                    old.runner.close(old_id)
                    self.evicted += 1
        with session.lock:
            if past_len != session.past_len:
                raise ServeError(409, "past_len_mismatch",
                                 f"split session '{session_id}': the device says {past_len} positions are cached, "
                                 f"the edge holds {session.past_len}", "x-gaisnet-past-len")
            try:
                logits = session.runner.forward(session_id, hidden, past_len)  # (V,)
            except ValueError as e:  # the runner lost the session's cache (its own LRU bound)
                raise ServeError(409, "past_len_mismatch", str(e), "x-gaisnet-past-len") from None
            session.past_len = past_len + hidden.shape[1]
            session.last_used = time.monotonic()
        out = {"past_len": session.past_len, "adapter": served.adapter, "version": served.version}
        if want == "token":
            out["token"] = int(torch.argmax(logits))
        else:
            out["logits"] = tensor_to_bytes(logits)
        return out

    async def close_session(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.runner.close(session_id)
        return session is not None

    def on_tick(self) -> None:
        """Drop split sessions idle longer than the TTL (their KV caches go with them)."""
        cutoff = time.monotonic() - self.settings.split_session_ttl_s
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if s.last_used < cutoff]
            for sid in stale:
                self._sessions.pop(sid).runner.close(sid)
        if self.learner is not None:  # between rounds: distil escalations into the served edge adapters
            self.learner.on_tick(dict(self._slots))

    async def split_info(self) -> dict:
        """What a device needs to run the front half: the cut, the model's sizes, the served version."""
        served = await self.current()
        if served.adapter == BASE:
            raise ServeError(422, "split_needs_adapter",
                             "split inference runs an adapter ('global' or an edge's), not 'base'", "adapter")
        config = served.model.config
        return {"adapter": served.adapter, "version": served.version, "front_layers": self.front_end,
                "num_layers": served.split_model().num_layers, "hidden_size": config.hidden_size,
                "max_context": served.max_context, "payload": "safetensors, tensor key 'hidden', shape (1, T, H)"}

    # ---------------------------------------------------------------------------------- info
    async def info(self) -> dict:
        return {
            "tier": self.tier,
            "adapters_loaded": {name: slot.current.version for name, slot in list(self._slots.items())},
            "split": {"front_layers": self.front_end, "open_sessions": len(self._sessions),
                      "max_sessions": self.settings.max_split_sessions, "evicted_sessions": self.evicted,
                      "pinned_versions": [f"{a}@v{v}" for a, v in self._pinned]},
            "poll": self.poll_info(),
            "batching": self.batch_info(),
            "device": self.torch_device,
            "learning": self.learner.info() if self.learner is not None else None,
        }
