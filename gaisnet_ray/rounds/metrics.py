"""A round's metrics row, built in one place.

Why: the row used to be a dict the cloud started, the driver mutated (faults, relay bytes down,
memory, wall time, the plan) and the in-process runtime mutated differently. ``RoundMetrics``
holds each layer's part as a field and ``row()`` lays them out once, in one key order, for
``metrics.jsonl`` (the outside contract: round, train_loss, eval, bytes_up, bytes_down, wall_s).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FaultReport:
    """What went wrong in a round, and the run's dead nodes after it."""

    dropped: dict[str, str] = field(default_factory=dict)  # device -> why it sat the round out
    lost_edges: list[str] = field(default_factory=list)  # edges that died in this round (sorted)
    reassigned: dict[str, str] = field(default_factory=dict)  # device -> the edge it moved to
    dead_devices: list[str] = field(default_factory=list)  # sorted, the whole run so far
    dead_edges: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"dropped": dict(self.dropped), "lost_edges": list(self.lost_edges),
                "reassigned": dict(self.reassigned), "dead_devices": list(self.dead_devices),
                "dead_edges": list(self.dead_edges)}


@dataclass(frozen=True)
class RoundMetrics:
    """One round, by who measured what.

    ``cloud``: what ``CloudCore.aggregate_round`` reports (round, version, scheme, train_loss,
    bytes, bytes_up/down, modeled_comm_s, edge_wall_s, clusters, privacy, eval, relay up);
    ``relay_down``: bytes of the new base each node took (``relay_down_bytes``), when a relay ran;
    ``faults``: the scheduler's report (Ray runtime only); ``peak_rss_mb``: per actor kind (Ray
    only); ``wall_s``: the whole round; ``plan``: modeled vs measured (``RunPlan.metrics`` plus
    ``measured_train_s``) when a planner ran.
    """

    cloud: dict
    relay_down: dict | None = None
    faults: FaultReport | None = None
    peak_rss_mb: dict | None = None
    wall_s: float | None = None
    plan: dict | None = None

    def row(self) -> dict:
        """The metrics.jsonl object: the cloud's keys, then the runtime's, in a fixed order."""
        row = dict(self.cloud)
        if self.relay_down is not None and "relay" in row:
            row["relay"] = {**row["relay"], "bytes_down": self.relay_down}
        if self.faults is not None:
            row["faults"] = self.faults.as_dict()
        if self.peak_rss_mb is not None:
            row["peak_rss_mb"] = self.peak_rss_mb
        if self.wall_s is not None:
            row["wall_s"] = self.wall_s
        if self.plan is not None:
            row["plan"] = self.plan
        return row
