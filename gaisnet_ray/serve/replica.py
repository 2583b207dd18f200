"""What every tier replica shares: the run folder, settings, torch setup, hot-swap polling, and
batched generation (concurrent requests decoded together, ``inference.batch``).

Deployments (``end.py``, ``edge.py``, ``cloud.py``) subclass ``TierReplica``; it holds no Ray
state itself, so the polling and loading logic is the same one the unit tests exercise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

from ray import serve

from ..config import ConfigError, ServeSettings, ServeTier, load_config
from ..inference.batch import BatchCounters, BatchRow, batch_stream
from ..inference.generate import Generation, PromptTooLongError
from ..inference.served import ServedRun
from ..layout import RunLayout
from ..worker_setup import setup_worker
from .errors import prompt_too_long
from .metrics import ServeMetrics
from .slots import (
    GenerationRequest,
    ModelSlot,
    ServedModel,
    StreamStart,
    TierAnswer,
    latest_of,
    load_served,
    poll_versions,
)

log = logging.getLogger(__name__)
_DONE = object()


def front_layers_for(run_dir: str | Path, settings: ServeSettings) -> int:
    """Blocks in the device front: the setting, else the run's ``topology.cut.front_layers``, else 1."""
    if settings.split_front_layers is not None:
        return settings.split_front_layers
    cfg_path = RunLayout(run_dir).config
    if cfg_path.is_file():
        try:
            return load_config(cfg_path).topology.cut.front_layers
        except ConfigError as e:
            log.warning("%s: %s; split inference uses a 1-block front (set serve.split_front_layers)", cfg_path, e)
    return 1


class TierReplica:
    tier = "?"

    def __init__(self, run_dir: str, settings: dict, resources: ServeTier):
        self.settings = ServeSettings.model_validate(settings)
        self.torch_device = setup_worker(self.settings.torch_threads, resources.num_gpus)
        self.run = ServedRun(run_dir)
        self.started_at = time.time()
        self.poll_state: dict = {"error": None, "last_poll": None, "swaps": 0}
        self._poll_task: asyncio.Task | None = None
        self.configure_batching()

    # ------------------------------------------------------------------------------ models
    def load(self, adapter: str, version: int | None) -> ServedModel:
        return load_served(self.run, adapter, version, max_prompt_tokens=self.settings.max_prompt_tokens,
                           torch_device=self.torch_device)

    def new_slot(self, adapter: str) -> ModelSlot:
        return ModelSlot(adapter, self.load, lambda a: latest_of(self.run, a))

    def slots(self) -> list[ModelSlot]:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- hot swap
    def start_polling(self) -> None:
        """Start the version poller on the replica's event loop (the constructor runs on it)."""
        loop = asyncio.get_event_loop()

        swaps = ServeMetrics()  # gaisnet_swaps_total{tier, adapter} (metrics.py)

        def swapped(slot: ModelSlot) -> None:
            self.poll_state["swaps"] += 1
            swaps.swapped(self.tier, slot.adapter)

        self._poll_task = loop.create_task(
            poll_versions(self.slots, self.settings.poll_interval_s, self.poll_state, swapped, self.on_tick))

    def on_tick(self) -> None:
        """Called once per poll tick (after the refreshes); tiers hook housekeeping here."""

    def check_health(self) -> None:
        """Serve's health check: a dead poller means versions would silently stop updating."""
        task = self._poll_task
        if task is not None and task.done():
            exc = task.exception() if not task.cancelled() else None
            raise RuntimeError(f"{self.tier}: knowledge version poller stopped: {exc!r}")

    def poll_info(self) -> dict:
        error = self.poll_state["error"]
        return {"interval_s": self.settings.poll_interval_s, "last_poll": self.poll_state["last_poll"],
                "swaps": self.poll_state["swaps"], "error": None if error is None else self.run.redact(error)}

    # --------------------------------------------------------------------------- generation
    # Batching. Concurrent requests of one replica go through Ray Serve's ``@serve.batch`` (a
    # generator batch function: one yield per decoding step, one entry per request). Per-request
    # sampling, seeds, stop strings and token budgets need no queue of our own: they are per-row state
    # of ``inference.batch`` (each row its own ``RowDecoder``), and Serve already splits a batch by
    # multiplexed model id (the edge's adapter). Inside a batch, rows are grouped once more by the
    # ``ServedModel`` they hold: during a hot swap old- and new-version rows share a batch call, not a
    # forward pass. Adapters are not mixed in one forward pass: peft's ``adapter_names=`` does work on
    # these models, but each adapter version here is its own model on the base its lineage names (a
    # relay can change the base; adapters swap independently), and Serve splits by adapter first.
    # Measured limit (benchmarks/batch_bench.py): Serve 2.60 forms a batch when its first request
    # arrives (+ batch_wait_timeout_s), not when the model frees up, so requests arriving during a
    # batch form small batches queued behind it; a queue that takes every waiting request when the
    # model is free (or rows joining a running batch) is the next step.
    def configure_batching(self) -> None:
        """Batch size and wait from the settings; a replica never holds more than
        ``max_ongoing_requests``, so a larger batch could never fill (and Serve would warn)."""
        self.batch_size = min(self.settings.batch_max_size, self.settings.max_ongoing_requests)
        self.batch_counters = BatchCounters()
        if self.batch_size > 1:
            self._decode_batch.set_max_batch_size(self.batch_size)
            self._decode_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def batch_info(self) -> dict:
        return {"max_size": self.batch_size, "wait_timeout_s": self.settings.batch_wait_timeout_s,
                **self.batch_counters.info()}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # replaced per replica by configure_batching
    async def _decode_batch(self, served: list[ServedModel], rows: list[BatchRow]) -> AsyncIterator[list]:
        """Serve's batch of (model, row) pairs: per step, each request's items (text deltas, then its
        ``Generation``); ``StopIteration`` for a request whose answer is complete. Each step of every
        group runs in one worker thread hop, so the event loop keeps admitting requests."""
        groups: dict[int, list[int]] = {}
        for i, model in enumerate(served):
            groups.setdefault(id(model), []).append(i)
        streams = [(idx, batch_stream(served[idx[0]].model, served[idx[0]].generator.tokenizer,
                                      [rows[i] for i in idx], self.batch_counters)) for idx in groups.values()]
        ended = [False] * len(rows)
        while streams:
            steps = await asyncio.to_thread(_advance, [stream for _, stream in streams])
            out: list = [StopIteration if e else [] for e in ended]
            alive = []
            for (idx, stream), step in zip(streams, steps):
                if step is _DONE:
                    continue
                alive.append((idx, stream))
                for i, items in zip(idx, step):
                    out[i] = items
                    ended[i] = ended[i] or any(isinstance(item, Generation) for item in items)
            streams = alive
            if alive:
                yield out

    async def answer(self, served: ServedModel, req: GenerationRequest) -> TierAnswer:
        if self.batch_size <= 1:
            return await asyncio.to_thread(served.generate, self.tier, req)
        async for item in self.answer_stream(served, req):
            if isinstance(item, TierAnswer):
                return item
        raise RuntimeError(f"{self.tier}: batched generation ended without an answer")

    async def answer_stream(self, served: ServedModel, req: GenerationRequest) -> AsyncIterator:
        """``StreamStart`` (once the prompt is accepted), text deltas as the model produces them, then
        the ``TierAnswer``. Batched: the request joins the replica's next batch (``_decode_batch``);
        otherwise each model step of this request alone runs in a worker thread."""
        started = time.perf_counter()
        if self.batch_size > 1:
            row = served.batch_row(req)  # a prompt over the limit fails here, before the stream begins
            yield StreamStart(self.tier, served.adapter, served.version)
            try:
                async for items in self._decode_batch(served, row):
                    for item in items:
                        if isinstance(item, Generation):
                            yield TierAnswer(self.tier, served.adapter, served.version, item,
                                             time.perf_counter() - started)
                        else:
                            yield item
            finally:  # the caller went away (a cancelled stream): the row leaves the batch at the next step
                row.cancel.set()
            return
        steps = served.generator.stream(req.prompt, **req.decode_kwargs())
        async for item in stream_steps(steps, StreamStart(self.tier, served.adapter, served.version)):
            if isinstance(item, Generation):
                yield TierAnswer(self.tier, served.adapter, served.version, item, time.perf_counter() - started)
            else:
                yield item


def _advance(streams: list[Iterator]) -> list:
    """One step of each batch stream (``_DONE`` for a stream that has ended)."""
    return [next(stream, _DONE) for stream in streams]


async def stream_steps(steps: Iterator, start: StreamStart) -> AsyncIterator:
    """Drive a sync generation generator from the event loop, one step per worker-thread hop.

    The first step (prompt check + prompt forward) runs before ``start`` is yielded, so a rejected
    prompt fails the call instead of breaking a stream that has begun.
    """
    first = True
    while True:
        try:
            item = await asyncio.to_thread(next, steps, _DONE)
        except PromptTooLongError as e:
            raise prompt_too_long(e.prompt_tokens, e.limit) from None
        if first:
            yield start
            first = False
        if item is _DONE:
            return
        yield item
