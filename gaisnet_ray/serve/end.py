"""The end tier: the device's front segment (embeddings + the first blocks of the global model),
run inside the cluster as a device would run it. Each generation keeps its own front KV cache and
sends only hidden states to the edge, which runs the rest with its own KV cache per session; the
tokens, the sampling and the text stay here."""

from __future__ import annotations

import time
import uuid

from ray import serve
from ray.serve.handle import DeploymentHandle

from ..config import ServeSettings
from ..inference.codec import tensor_from_bytes, tensor_to_bytes
from ..inference.generate import Generation, PromptTooLongError
from ..inference.served import GLOBAL
from ..inference.split import FrontRunner, split_stream
from .errors import prompt_too_long
from .replica import TierReplica, front_layers_for, stream_steps
from .slots import GenerationRequest, ModelSlot, ServedModel, StreamStart, TierAnswer

@serve.deployment(name="end")
class EndTier(TierReplica):
    tier = "end"

    def __init__(self, edge: DeploymentHandle, run_dir: str, settings: dict):
        super().__init__(run_dir, settings, ServeSettings.model_validate(settings).end)
        self.edge = edge.options(multiplexed_model_id=GLOBAL)
        self.front_end = front_layers_for(run_dir, self.settings)
        self.global_slot = self.new_slot(GLOBAL)
        self.start_polling()

    def slots(self) -> list[ModelSlot]:
        return [self.global_slot]

    def _steps(self, served: ServedModel, req: GenerationRequest):
        """The split generation (a sync generator; runs in a worker thread, calls the edge per token)."""
        try:
            ids = served.generator.encode_prompt(req.prompt, req.chat)  # checks the prompt limit
        except PromptTooLongError as e:
            raise prompt_too_long(e.prompt_tokens, e.limit) from None
        session, past = f"end-{uuid.uuid4().hex}", 0
        front = FrontRunner(served.split_model(), self.front_end)

        def rest(hidden):
            nonlocal past
            out = self.edge.split_forward.remote(session, past, served.version, tensor_to_bytes(hidden),
                                                 "logits").result()
            past = out["past_len"]
            return tensor_from_bytes(out["logits"])

        kwargs = req.decode_kwargs()
        kwargs.pop("chat")
        kwargs["max_new_tokens"] = max(0, min(req.max_new_tokens, served.max_context - len(ids)))
        try:
            yield from split_stream(front, rest, served.generator.tokenizer, ids, **kwargs)
        finally:
            self.edge.close_session.remote(session)

    async def stream(self, req: GenerationRequest):
        served, started = self.global_slot.current, time.perf_counter()
        start = StreamStart(self.tier, served.adapter, served.version)
        async for item in stream_steps(self._steps(served, req), start):
            if isinstance(item, Generation):
                yield TierAnswer(self.tier, served.adapter, served.version, item, time.perf_counter() - started)
            else:
                yield item

    async def generate(self, req: GenerationRequest) -> TierAnswer:
        async for item in self.stream(req):
            if isinstance(item, TierAnswer):
                return item
        raise RuntimeError("split generation ended without an answer")

    async def info(self) -> dict:
        return {"tier": self.tier, "adapters_loaded": {GLOBAL: self.global_slot.current.version},
                "split": {"front_layers": self.front_end}, "poll": self.poll_info(), "device": self.torch_device}
