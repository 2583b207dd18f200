"""The cloud tier: the foundation model with the latest global knowledge, swapped in when the
training loop publishes a new version. It answers what the edge escalates and cloud-only requests."""

from __future__ import annotations

from ray import serve

from ..config import ServeSettings
from ..inference.served import GLOBAL
from .replica import TierReplica
from .slots import GenerationRequest, ModelSlot, TierAnswer


@serve.deployment(name="cloud")
class CloudTier(TierReplica):
    tier = "cloud"

    def __init__(self, run_dir: str, settings: dict):
        super().__init__(run_dir, settings, ServeSettings.model_validate(settings).cloud)
        self.global_slot = self.new_slot(GLOBAL)
        self.start_polling()

    def slots(self) -> list[ModelSlot]:
        return [self.global_slot]

    async def generate(self, req: GenerationRequest) -> TierAnswer:
        return await self.answer(self.global_slot.current, req)

    async def stream(self, req: GenerationRequest):
        async for item in self.answer_stream(self.global_slot.current, req):
            yield item

    async def info(self) -> dict:
        return {"tier": self.tier, "adapters_loaded": {GLOBAL: self.global_slot.current.version},
                "poll": self.poll_info(), "batching": self.batch_info(), "device": self.torch_device}
