"""Centralized: every device's private data pooled in ONE trainer, the whole model, no split.

NOT PRIVATE: this baseline is the privacy-violating upper bound of the study (issue 10). It stands
for "send all the data to one place and fine-tune there", which GaisNet exists to avoid; its
numbers say how much of that quality the private schemes reach, nothing more. The run's metrics
rows and run.json carry ``privacy_note`` so a result of it is never read as a private one.

Same model, data, steps and seeds as the other schemes: the trainer is the topology's first device
(``end-0-0``, so it draws that device's batch-order seed); it holds the concatenation of every
device's private examples (in topology order) and, in each round, trains one turn of as many
steps as all of that round's device turns together (``local_steps`` x participating devices). The
rest of the round is the usual one (its edge and the cloud aggregate one update), so with one
edge, one device and one cluster it is exactly ``hfsl``: same data, same steps, same seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .fl import FL
from .topology import devices_by_edge

if TYPE_CHECKING:
    from ..config import Config


def trainer_of(cfg: Config) -> str:
    """The device that holds the pooled data: the topology's first."""
    return next(iter(devices_by_edge(cfg.topology).values()))[0]


class Centralized(FL):
    name: ClassVar[str] = "centralized"
    secure_aggregation: ClassVar[bool] = False  # one trainer: there is no sum of several adapters to mask
    privacy_note: ClassVar[str | None] = (
        "centralized: every device's private data pooled in one trainer - the privacy-violating upper "
        "bound, not a private scheme")

    @property
    def label(self) -> str:
        return "centralized rounds (pooled data, NOT private)"

    def round_devices(self, cfg: Config, edge: str, devices: list[str]) -> list[str] | None:
        trainer = trainer_of(cfg)
        return [d for d in devices if d == trainer]

    def device_data(self, cfg: Config, examples: dict[str, list]) -> dict[str, list]:
        pooled = [ex for exs in examples.values() for ex in exs]
        return {**examples, trainer_of(cfg): pooled}

    def turn_steps(self, cfg: Config) -> int:
        """As many steps as every participating device's turn of a round together."""
        t, topo = cfg.training, cfg.topology
        per_edge = min(topo.devices_per_edge, t.participants_per_edge or topo.devices_per_edge)
        return t.local_steps * per_edge * topo.edges
