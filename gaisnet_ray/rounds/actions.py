"""What the round scheduler decides, as small frozen records a runtime carries out.

Why separate: the actions are the contract between ``RoundScheduler`` (no Ray) and its runtimes
(the Ray driver, the in-process loop); each runtime reads this file to know what it must do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    """One member's turn in one cluster; ``host`` is the actor that runs it."""

    edge: str
    cluster: str
    device: str
    host: str


# ------------------------------------------------------------------------------------ actions
@dataclass(frozen=True)
class BeginEdge:
    """Send the edge the global knowledge and this round's clusters (cluster id -> members)."""

    edge: str
    clusters: dict[str, list[str]]


@dataclass(frozen=True)
class StartTurn:
    """Start ``turn``: the edge absorbs ``previous`` (the cluster's last finished turn, not yet
    absorbed; None: nothing new) and hands out the adapter; the host trains on it."""

    turn: Turn
    previous: Turn | None


@dataclass(frozen=True)
class DropTurn:
    """Tell the edge ``turn`` sits out (it undoes whatever the turn did to its middle adapter)."""

    turn: Turn
    reason: str


@dataclass(frozen=True)
class RestartHost:
    """Kill the worker ``host`` (a turn on it hung) and start it afresh with the same devices;
    report ``host_ready`` or ``host_lost``."""

    host: str
    devices: tuple[str, ...]


@dataclass(frozen=True)
class FinishEdge:
    """Close the edge's round: cluster id -> its last finished turn not yet absorbed (or None)."""

    edge: str
    last: dict[str, Turn | None]


@dataclass(frozen=True)
class Move:
    """``faults.edge_failure: reassign``: ``device`` of a lost edge is to be served by ``target``."""

    device: str
    target: str
