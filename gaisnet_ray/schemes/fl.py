"""FL: plain federated learning. Every device holds the whole model and trains the whole adapter
alone (its own cluster, no split step, no edge compute); edges and the cloud only aggregate."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .base import Scheme

if TYPE_CHECKING:
    from ..config import Config


class FL(Scheme):
    name: ClassVar[str] = "fl"
    splits: ClassVar[bool] = False
    secure_aggregation: ClassVar[bool] = True

    def cluster_size(self, cfg: Config, devices: int) -> int:
        return 1

    def clusters(self, cfg: Config, edge: str, sample_counts: dict[str, int],
                 planned: list[list[str]] | None = None) -> list[list[str]]:
        return [[d] for d in sample_counts]
