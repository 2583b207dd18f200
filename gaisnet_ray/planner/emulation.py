"""Heterogeneous devices on one machine (``planner.emulate``, local dev mode).

A device actor runs at the host's speed; to check a plan here, its turn is made to take what its
profile says: its own compute (the turn's wall time minus the time it waited on its edge) takes
the cost model's FLOPs of its turn at its profile's speed (or what it measured, if that is more: an
emulated device is never faster than the host, and a host crowded by the other actors shows here
too), and its transfers take ``bytes / rate + latency`` per message on its link model (rate: its
own link or its cluster's share of the edge's, the lower). The extra time is slept at the end of
the turn (the edge, which is not emulated, is not held up meanwhile) and counted in the turn's
``compute_s``. Targeting the modeled compute rather than stretching the measured one keeps the
emulation from multiplying the noise of a shared host by the slow-down. No torch here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceEmulation:
    compute_s: float  # the turn's own compute at the device's speed (cost model)
    up_bps: float
    down_bps: float
    latency_s: float
    slowdown: float = 1.0  # host speed / the device's (reported; >= 1 when the device is slower)

    def transfer_s(self, link) -> float:
        """Seconds the turn's traffic (a ``LinkUsage``) takes on this device's link."""
        return (8.0 * link.bytes_up / self.up_bps + 8.0 * link.bytes_down / self.down_bps
                + (link.messages_up + link.messages_down) * self.latency_s)

    def run_turn(self, train, link):
        """``train(link)`` -> ``TurnResult``, made to take this device's time."""
        timed = _TimedLink(link) if link is not None else None
        started = time.perf_counter()
        result = train(timed)
        own = time.perf_counter() - started - (timed.waited_s if timed is not None else 0.0)
        extra = max(0.0, self.compute_s - own) + self.transfer_s(result.link)
        time.sleep(extra)
        result.compute_s += extra
        return result


class _TimedLink:
    """The device's link to its edge, timing how long the device waits on the edge."""

    def __init__(self, link):
        self.link, self.waited_s = link, 0.0

    def forward(self, hidden):
        t = time.perf_counter()
        try:
            return self.link.forward(hidden)
        finally:
            self.waited_s += time.perf_counter() - t

    def backward(self, grad):
        t = time.perf_counter()
        try:
            return self.link.backward(grad)
        finally:
            self.waited_s += time.perf_counter() - t
