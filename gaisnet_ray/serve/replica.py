"""What every tier replica shares: the run folder, settings, torch setup, hot-swap polling.

Deployments (``end.py``, ``edge.py``, ``cloud.py``) subclass ``TierReplica``; it holds no Ray
state itself, so the polling and loading logic is the same one the unit tests exercise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

from ..config import ConfigError, ServeSettings, ServeTier, load_config
from ..inference.generate import Generation, PromptTooLongError
from ..inference.served import ServedRun
from ..layout import RunLayout
from ..worker_setup import setup_worker
from .errors import prompt_too_long
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

        def swapped(slot: ModelSlot) -> None:
            self.poll_state["swaps"] += 1

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
    async def answer(self, served: ServedModel, req: GenerationRequest) -> TierAnswer:
        return await asyncio.to_thread(served.generate, self.tier, req)

    async def answer_stream(self, served: ServedModel, req: GenerationRequest) -> AsyncIterator:
        """``StreamStart`` (once the prompt is accepted), text deltas as the model produces them, then
        the ``TierAnswer``. Each model step runs in a worker thread."""
        started = time.perf_counter()
        steps = served.generator.stream(req.prompt, **req.decode_kwargs())
        async for item in stream_steps(steps, StreamStart(self.tier, served.adapter, served.version)):
            if isinstance(item, Generation):
                yield TierAnswer(self.tier, served.adapter, served.version, item, time.perf_counter() - started)
            else:
                yield item


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
