"""The interface every training scheme implements: what shape a round has under it.

A scheme answers, from the config alone, the questions the runtimes, the planner, the memory
estimate and the CLI used to answer by comparing ``training.scheme`` strings:

- what each tier holds: a device's cut (None: it trains the whole model, no edge in its step),
  its part of the foundation, an edge's part;
- who trains with whom: an edge's clusters for one round, the cluster size, how many clusters
  an edge may run (the planner's search space), how many hold a forward graph at once (memory);
- how it is named on the console.

The default methods are those of a split scheme (devices hold a cut, the edge the middle blocks);
a scheme where devices train the whole model sets ``splits = False`` (see ``fl.py``). Like
Flower's ``Strategy``: a small class per scheme, one file each, no torch at import (parts and cuts
are imported where used), chosen in one place (``schemes.scheme_of``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from .topology import device_cut

if TYPE_CHECKING:
    from ..config import Config, TopologyConfig
    from ..models.cuts import Cut, ModelPart


class Scheme(ABC):
    """One training scheme. Subclasses set ``name`` (the ``training.scheme`` value) and say how an
    edge's devices are grouped (``cluster_size``, ``clusters``)."""

    name: ClassVar[str]
    # devices train split with their edge (each holds its cut's front and back blocks, the edge the
    # middle ones); False: each device holds and trains the whole model and the edge none of it
    splits: ClassVar[bool] = True
    # the most clusters an edge runs in one round (None: as many as the cluster size makes)
    max_clusters: ClassVar[int | None] = None
    # the cluster size is a free choice (``topology.cluster_size``): the planner may sweep it
    free_cluster_size: ClassVar[bool] = False
    # an edge averages its devices' whole adapters, each device its own cluster: secure aggregation
    # (privacy.secure_aggregation) can mask them; a split scheme's edge must see each adapter
    secure_aggregation: ClassVar[bool] = False
    # each device keeps the adapter it trained from round to round (none is averaged into what it
    # trains next), and the cloud evaluates every device's own adapter (``local``)
    keeps_adapters: ClassVar[bool] = False
    # what the run's metrics and run.json say the scheme is, when it is not a private one
    # (``centralized`` pools every device's private data in one trainer)
    privacy_note: ClassVar[str | None] = None

    # --------------------------------------------------------------- baselines' hooks (issue 10)
    def check(self, cfg: Config) -> None:
        """Refuse (``ConfigError``) a config this scheme cannot run; every scheme of the paper can
        run every config."""

    def round_devices(self, cfg: Config, edge: str, devices: list[str]) -> list[str] | None:
        """The devices of ``edge`` that train every round whatever ``training.participants_per_edge``
        samples; None: the sampled participants (every scheme of the paper)."""
        return None

    def device_data(self, cfg: Config, examples: dict[str, list]) -> dict[str, list]:
        """Each device's training examples from every device's private ones (``examples``, in
        topology order): its own."""
        return examples

    def turn_steps(self, cfg: Config) -> int:
        """Optimizer steps of one device turn."""
        return cfg.training.local_steps

    @property
    def label(self) -> str:
        """What the progress bar calls a round of this scheme."""
        return f"{self.name.upper()} rounds"

    # ------------------------------------------------------------------ what each tier holds
    def device_cut(self, topo: TopologyConfig, device: str, num_layers: int) -> Cut | None:
        """The cut ``device`` trains with; None: it trains the whole model alone."""
        return device_cut(topo, device, num_layers) if self.splits else None

    def device_part(self, topo: TopologyConfig, device: str, num_layers: int) -> ModelPart:
        """The part of the foundation ``device`` holds: embeddings, its front and back blocks, final
        norm and head under a split scheme; the whole model otherwise."""
        from ..models.cuts import ModelPart

        cut = self.device_cut(topo, device, num_layers)
        return ModelPart.whole() if cut is None else cut.device_part(num_layers)

    def edge_part(self, topo: TopologyConfig, devices: list[str], num_layers: int) -> ModelPart:
        """The part an edge serving ``devices`` holds: the union of their middle blocks (none when
        devices train the whole model)."""
        from ..models.cuts import ModelPart, edge_part

        if not self.splits:
            return ModelPart.of((), embeddings=False, head=False)
        return edge_part(device_cut(topo, d, num_layers) for d in devices)

    # ------------------------------------------------------------------- who trains with whom
    @abstractmethod
    def cluster_size(self, cfg: Config, devices: int) -> int:
        """Devices per cluster when an edge has ``devices`` of them this round."""

    @abstractmethod
    def clusters(self, cfg: Config, edge: str, sample_counts: dict[str, int],
                 planned: list[list[str]] | None = None) -> list[list[str]]:
        """The clusters of ``edge`` for one round, each in training order, from this round's
        devices (``sample_counts``: device -> private examples, in topology order). ``planned``:
        the planner's clusters of this edge, for schemes it plans."""

    def clusters_in_flight(self, cfg: Config, devices: int) -> int:
        """How many of an edge's clusters can hold a forward graph on it at once (memory
        estimate): every cluster of a split scheme, none when the edge runs no block."""
        if not self.splits:
            return 0
        t = cfg.training
        if t.participants_per_edge:
            devices = min(devices, t.participants_per_edge)
        return -(-devices // self.cluster_size(cfg, devices))  # ceil
