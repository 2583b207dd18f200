"""What an edge escalated, kept on the edge's node, and the replica's learning from it
(``serve.learn_from_escalations``, off by default; bounds in ``serve.learn.*``).

Flow: the router escalates an edge answer to the cloud; once the cloud's answer is complete it
calls ``hand_back``, which sends one ``EscalationRecord`` (prompt, the cloud's text) to the edge
deployment, addressed by the adapter that escalated (``multiplexed_model_id``), fire and forget.
The edge replica appends it to that edge's ``EscalationStore``, a JSONL file in the edge's own
area (``RunLayout.edge_private(edge)`` or ``serve.learn.store_dir/<edge>``; owner-only
permissions). Between rounds, ``EscalationLearner`` distils the stored pairs into a copy of the
served edge adapter in a background thread (``inference.learn.distil``), serves the copy, and
writes the learned delta beside the store for the edge's aggregation (``hfsl.edge``).

Privacy: these are user prompts, held by the edge that received them. They are never put in a
message to another node, never under ``knowledge/`` (which is relayed), never in ``/health``
(counts only). What leaves the edge node is the adapter delta, the same contract as device data.
The cloud already saw each prompt (it answered it). Only escalations of an edge's own adapter
(``edge-N``) are kept: an answer of ``global`` or ``base`` belongs to no edge.

The store is bounded: at most ``max_records`` pairs (one per distinct prompt, the newest answer
wins; the oldest go first), prompts and answers of at most ``max_chars``, none older than
``retention_s``. The file is appended to and compacted to the bounds when it holds twice as many lines.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import LearnSettings, ServeSettings
from ..inference.generate import CausalGenerator
from ..inference.learn import AnswerPair, distil, edge_area, save_learned

log = logging.getLogger(__name__)
STORE_NAME = "escalations.jsonl"
ANCHOR_NAME = "kept.jsonl"  # serve.learn.anchors: answers the edge kept (its own), distilled beside the escalations
EDGE_ADAPTER_PREFIX = "edge-"  # the adapters that belong to one edge (knowledge/edges/<edge>)


@dataclass(frozen=True)
class EscalationRecord:
    """One escalated request as its edge keeps it."""

    prompt: str
    answer: str  # the cloud's text
    chat: bool
    edge: str  # the edge adapter that escalated (edge-N)
    domain: str | None = None
    edge_version: int | None = None
    cloud_version: int | None = None
    at: float = 0.0  # unix time it was stored
    source: str = "cloud"  # "cloud": an escalation and the cloud's answer; "edge": an answer the edge kept (anchor)

    @property
    def key(self) -> tuple[str, bool]:
        return (self.prompt, self.chat)


def escalation_record(req, domain: str | None, edge_attempt, cloud_answer) -> EscalationRecord | None:
    """The record of an escalation (``req``: GenerationRequest; the two ``TierAnswer``s), or None
    when there is nothing to learn: not the cloud's answer, not an edge's own adapter, no text."""
    if edge_attempt is None or cloud_answer is None or cloud_answer.tier != "cloud":
        return None
    if not edge_attempt.adapter.startswith(EDGE_ADAPTER_PREFIX) or not cloud_answer.generation.text.strip():
        return None
    return EscalationRecord(req.prompt, cloud_answer.generation.text, req.chat, edge_attempt.adapter, domain,
                            edge_attempt.version, cloud_answer.version, time.time())


def kept_record(req, domain: str | None, answer) -> EscalationRecord | None:
    """An answer an edge adapter gave and the router kept (``serve.learn.anchors``), or None."""
    if answer is None or answer.tier != "edge" or not answer.adapter.startswith(EDGE_ADAPTER_PREFIX):
        return None
    if not answer.generation.text.strip():
        return None
    return EscalationRecord(req.prompt, answer.generation.text, req.chat, answer.adapter, domain, answer.version,
                            None, time.time(), source="edge")


def _send(edge_handle, record: EscalationRecord | None, what: str) -> None:
    """Fire and forget ``record`` to the edge replica holding its adapter; a lost record is logged,
    never raised: learning must not fail a request that was answered."""
    if record is None:
        return
    try:
        edge_handle.options(multiplexed_model_id=record.edge).record_escalation.remote(record)
    except Exception as e:  # noqa: BLE001 - the answer still goes out
        log.warning("could not hand %s back to %s: %s: %s", what, record.edge, type(e).__name__, e)


def hand_back(edge_handle, settings: ServeSettings, req, domain: str | None, edge_attempt, cloud_answer) -> None:
    """Router side: give the cloud's answer to the edge that escalated."""
    if settings.learn_from_escalations:
        _send(edge_handle, escalation_record(req, domain, edge_attempt, cloud_answer), "an escalation")


def hand_back_kept(edge_handle, settings: ServeSettings, req, domain: str | None, answer) -> None:
    """Router side, ``serve.learn.anchors``: an edge answer the router kept goes to that edge as an
    anchor for its next distillation."""
    if settings.learn_from_escalations and settings.learn.anchors:
        _send(edge_handle, kept_record(req, domain, answer), "a kept answer")


def store_folder(run_dir: str | Path, learn: LearnSettings, edge: str) -> Path:
    """The edge's own area: ``serve.learn.store_dir/<edge>``, else ``RUN/edges_private/<edge>``."""
    return edge_area(run_dir, learn.store_dir, edge)


class EscalationStore:
    """One edge's escalations: a bounded JSONL file on the edge's node (see the module doc)."""

    def __init__(self, folder: str | Path, learn: LearnSettings, clock=time.time, name: str = STORE_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.learn, self.clock = learn, clock
        self.added = 0  # kept by this process since it started
        self.refused = 0  # too long to keep

    @contextmanager
    def _locked(self):
        """An exclusive lock beside the file (several replicas of one edge on one node)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.folder / (STORE_NAME + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> tuple[list[EscalationRecord], int]:
        """Every well-formed line, in file order, and the number of lines."""
        if not self.path.is_file():
            return [], 0
        out, lines = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                lines += 1
                try:
                    out.append(EscalationRecord(**json.loads(line)))
                except (ValueError, TypeError):  # a torn last line after a crash: skipped
                    continue
        return out, lines

    def _bounded(self, records: list[EscalationRecord]) -> list[EscalationRecord]:
        """The newest record per prompt, none past retention, at most ``max_records`` (newest kept)."""
        cutoff = self.clock() - self.learn.retention_s
        latest: OrderedDict[tuple, EscalationRecord] = OrderedDict()
        for r in records:
            if r.at >= cutoff:
                latest.pop(r.key, None)
                latest[r.key] = r
        kept = list(latest.values())
        return kept[-self.learn.max_records:]

    def add(self, record: EscalationRecord) -> bool:
        """Keep ``record``; False when it is too long to keep (``max_chars``)."""
        limit = self.learn.max_chars
        if len(record.prompt) > limit or len(record.answer) > limit:
            self.refused += 1
            return False
        record = record if record.at else EscalationRecord(**{**asdict(record), "at": self.clock()})
        line = json.dumps(asdict(record), ensure_ascii=False) + "\n"
        with self._locked():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
            self.added += 1
            records, lines = self._read()
            if lines > 2 * self.learn.max_records:
                self._rewrite(self._bounded(records))
        return True

    def _rewrite(self, records: list[EscalationRecord]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def records(self) -> list[EscalationRecord]:
        """What the edge keeps now (bounds applied; the file is compacted when it has more)."""
        with self._locked():
            records, lines = self._read()
            kept = self._bounded(records)
            if len(kept) < lines:
                self._rewrite(kept)
        return kept

    def __len__(self) -> int:
        return len(self.records())


class EscalationLearner:
    """The edge replica's side: keep records per edge, and distil them into the served adapter
    between rounds, one distillation at a time, in a background thread (the replica keeps serving)."""

    def __init__(self, run_dir: str | Path, settings: ServeSettings, tokenizer, system: str | None,
                 max_prompt_tokens: int | None = None):
        self.run_dir, self.settings, self.learn = Path(run_dir), settings, settings.learn
        self.tokenizer, self.system, self.max_prompt_tokens = tokenizer, system, max_prompt_tokens
        self._stores: dict[str, EscalationStore] = {}
        self._state: dict[str, dict] = {}  # edge -> what its last distillation did (for /health)
        self._since: dict[str, int] = {}  # edge -> records added since its last distillation
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.seed = 0

    def store(self, edge: str) -> EscalationStore:
        with self._lock:
            if edge not in self._stores:
                self._stores[edge] = EscalationStore(store_folder(self.run_dir, self.learn, edge), self.learn)
            return self._stores[edge]

    def anchors(self, edge: str) -> EscalationStore:
        """The answers ``edge`` kept itself (``serve.learn.anchors``), same bounds, their own file."""
        with self._lock:
            key = "anchors:" + edge
            if key not in self._stores:
                self._stores[key] = EscalationStore(store_folder(self.run_dir, self.learn, edge), self.learn,
                                                    name=ANCHOR_NAME)
            return self._stores[key]

    def record(self, record: EscalationRecord) -> bool:
        if record.source == "edge":  # an anchor: kept, but it makes no distillation due
            return self.learn.anchors and self.anchors(record.edge).add(record)
        kept = self.store(record.edge).add(record)
        if kept:
            with self._lock:
                self._since[record.edge] = self._since.get(record.edge, 0) + 1
        return kept

    def due(self, edge: str, served) -> bool:
        """The edge holds at least ``min_records`` and either the served model is not the one last
        learned into (a new knowledge version arrived: a round ended; or the slot was reloaded) or
        ``every_records`` escalations came since. A failed distillation is not retried on the same
        version."""
        last = self._state.get(edge)
        if last is not None and last.get("error") and last.get("knowledge_version") == served.version:
            return False
        fresh = last is None or last.get("model_id") != id(served)
        every = self.learn.every_records
        many = every > 0 and self._since.get(edge, 0) >= every
        return (fresh or many) and len(self.store(edge)) >= self.learn.min_records

    def on_tick(self, slots: dict) -> None:
        """Start one background distillation over the edge slots that are due (``slots``: adapter
        name -> ModelSlot). Called from the replica's poll tick, after the hot swaps."""
        if self._thread is not None and self._thread.is_alive():
            return
        work = [(name, slot) for name, slot in list(slots.items())
                if name.startswith(EDGE_ADAPTER_PREFIX) and self.due(name, slot.current)]
        if work:
            self._thread = threading.Thread(target=self._run, args=(work,), name="learn-escalations", daemon=True)
            self._thread.start()

    def _run(self, work: list) -> None:
        for name, slot in work:
            try:
                self.learn_into(name, slot)
            except Exception as e:  # noqa: BLE001 - learning must not take the replica down
                log.warning("learning from %s's escalations failed: %s: %s", name, type(e).__name__, e)
                # recorded with the version, so the same failure is not retried every tick
                self._state[name] = {**self._state.get(name, {}), "knowledge_version": slot.current.version,
                                     "error": f"{type(e).__name__}: {e}"}

    def learn_into(self, edge: str, slot) -> dict:
        """Distil ``edge``'s escalations into a copy of the slot's served model, swap the copy in
        (when the slot still serves the model it was copied from), write the delta. Blocking."""
        served = slot.current
        with self._lock:
            since = self._since.get(edge, 0)
        records = self.store(edge).records()
        anchors = []
        if self.learn.anchors:  # what the edge answered itself stays as it was (less drift on neighbours)
            asked = {r.key for r in records}
            anchors = [r for r in self.anchors(edge).records() if r.key not in asked]
        pairs = [AnswerPair(r.prompt, r.answer, r.chat) for r in records + anchors]
        model = copy.deepcopy(served.model)
        self.seed += 1
        result = distil(model, self.tokenizer, pairs, steps=self.learn.steps, batch_size=self.learn.batch_size,
                        lr=self.learn.lr, seed=self.seed, system=self.system, max_len=served.max_context)
        generator = CausalGenerator(model, self.tokenizer, max_prompt_tokens=served.generator.max_prompt_tokens,
                                    max_context=served.max_context, system=self.system)
        learned = type(served)(served.adapter, served.version, model, generator, served.max_context)
        swapped = slot.current is served
        if swapped:
            slot.current = learned  # one assignment, as a hot swap: running requests keep their model
        state = {"knowledge_version": served.version, "records": len(records), "anchors": len(anchors),
                 "steps": result.steps,
                 "loss_before": round(result.loss_before, 4), "loss_after": round(result.loss_after, 4),
                 "wall_s": round(result.wall_s, 3), "served": swapped, "at": time.time(),
                 "distillations": self._state.get(edge, {}).get("distillations", 0) + 1}
        save_learned(store_folder(self.run_dir, self.learn, edge), result.delta, state)
        state["model_id"] = id(learned if swapped else served)  # what not to learn into again
        with self._lock:
            self._since[edge] = self._since.get(edge, 0) - since
        self._state[edge] = state
        log.info("learned %d escalations into %s v%s: answer loss %.3f -> %.3f", result.records, edge,
                 served.version, result.loss_before, result.loss_after)
        return state

    def info(self) -> dict:
        """Counts only (the prompts stay on the node): per edge, records kept and the last distillation."""
        return {edge: {"records": len(store), "added": store.added, "refused": store.refused,
                       "anchors": len(self.anchors(edge)) if self.learn.anchors else 0,
                       "last": {k: v for k, v in self._state.get(edge, {}).items() if k != "model_id"} or None}
                for edge, store in list(self._stores.items()) if not edge.startswith("anchors:")}
