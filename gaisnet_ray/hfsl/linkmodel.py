"""Link model: turn the bytes and messages moved on each link into a modeled transfer delay."""

from __future__ import annotations

from ..config import LinkConfig
from .messages import LinkUsage


def transfer_s(nbytes: int, messages: int, link: LinkConfig) -> float:
    """Seconds to move ``nbytes`` in ``messages`` messages: latency per message + bytes / bandwidth."""
    return messages * link.latency_ms / 1e3 + nbytes * 8 / (link.bandwidth_mbps * 1e6)


def turn_comm_s(usage: LinkUsage, link: LinkConfig) -> float:
    return transfer_s(usage.bytes_up + usage.bytes_down, usage.messages_up + usage.messages_down, link)


def clusters_comm_s(cluster_turns: list[list[LinkUsage]], link: LinkConfig) -> float:
    """Members of a cluster take turns (delays add up); clusters run in parallel (the max)."""
    return max((sum(turn_comm_s(u, link) for u in turns) for turns in cluster_turns), default=0.0)
