"""SL: sequential split learning. All of an edge's devices form one cluster and train in turn,
each split with the edge; edges run in parallel."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .base import Scheme

if TYPE_CHECKING:
    from ..config import Config


class SL(Scheme):
    name: ClassVar[str] = "sl"
    max_clusters: ClassVar[int | None] = 1

    def cluster_size(self, cfg: Config, devices: int) -> int:
        return max(devices, 1)

    def clusters(self, cfg: Config, edge: str, sample_counts: dict[str, int],
                 planned: list[list[str]] | None = None) -> list[list[str]]:
        return [list(sample_counts)]
