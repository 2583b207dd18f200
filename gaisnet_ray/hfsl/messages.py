"""What crosses a tier boundary during a round: small dataclasses of adapter tensors and metrics.

Activations (B, T, H) and their gradients cross as bare float tensors in the split step; nothing
here ever holds a token id, a label or a raw sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class LinkUsage:
    """Traffic on one device's end-edge link during one turn (counted by the device)."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0

    def add(self, other: "LinkUsage") -> "LinkUsage":
        return LinkUsage(
            self.bytes_up + other.bytes_up, self.bytes_down + other.bytes_down,
            self.messages_up + other.messages_up, self.messages_down + other.messages_down,
        )


@dataclass
class TurnResult:
    """A device's result after its turn: its trained adapter part and what the turn cost."""

    device_id: str
    cluster_id: str
    adapter: StateDict  # the device-held adapter keys (front+back, or all keys under FL)
    num_samples: int  # size of the device's private dataset (FedAvg weight)
    losses: list[float]  # training loss per step
    link: LinkUsage
    compute_s: float  # wall time of the turn on the device, waiting for the edge included
    # privacy.secure_aggregation: [w * adapter, w] masked in Z(2^48) (then ``adapter`` is empty)
    masked: torch.Tensor | None = None


@dataclass
class EdgeUpdate:
    """An edge's aggregated knowledge for one round, relayed up to the cloud with its lineage."""

    edge_id: str
    adapter: StateDict
    num_samples: int
    clusters: list[list[str]]  # device ids per cluster, in training order
    device_samples: dict[str, int]
    losses: list[float]  # every device step's loss this round
    end_edge: LinkUsage  # summed over the edge's devices
    modeled_comm_s: float  # end-edge part of the link model, clusters in parallel
    wall_s: float
    edge_compute_s: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)  # device -> why it sat out (died, timed out)
    secure_aggregation: dict | None = None  # the protocol's members, survivors and cost (None: off)
    # device -> its own adapter, only under a scheme where devices keep theirs (``local``), to be evaluated
    device_adapters: dict[str, StateDict] = field(default_factory=dict)
    # serve.learn_from_escalations: what the edge folded in from its serving escalations (records, weight,
    # the knowledge version the replica learned on); None: nothing this round
    escalations: dict | None = None
