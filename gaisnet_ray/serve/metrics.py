"""The serving app's Prometheus metrics, through ``ray.serve.metrics`` (Ray exports them from each
node's metrics agent, ``ray.nodes()[i]["MetricsExportPort"]``, with a ``ray_`` prefix and, on counters,
a ``_total`` suffix; Serve adds the ``deployment``, ``replica`` and ``application`` labels).

Why these: they answer "does the cascade pay" while it runs. Requests and answers per tier give
the cloud share; escalations by reason show which confidence signal sends work up; swaps show
knowledge versions arriving; the in-flight gauge is each tier's queue as the router sees it;
tokens and generation seconds per tier give tokens/s as a ratio of rates (exact, unlike a
histogram's bucket-midpoint sum); time to first token is what a streaming client waits.

Labels are few and fixed (tier names, route kinds, signal names, adapter names): never a prompt,
a number or a request id. The README lists every name for a Grafana board.
"""

from __future__ import annotations

from contextlib import contextmanager

from ray.serve.metrics import Counter, Gauge, Histogram

PREFIX = "gaisnet_"
# Seconds: first tokens on a CPU take tens of ms to seconds; escalations add a second hop.
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ROUTES = ("hint", "adapter", "kept", "escalated", "fallback")
"""How an answer came about: a tier hint, a pinned adapter, an edge answer the policy kept, the cloud
after an escalation, or the edge's answer kept because the cloud could not take the escalation."""


class ServeMetrics:
    """The metrics one replica records (one instance per replica process: the ingress' router
    records routing, every tier replica its swaps)."""

    def __init__(self):
        self.requests = Counter(PREFIX + "tier_requests", description="Requests the router sent to a tier "
                                "(an escalated request counts at the edge, for its probe, and at the cloud).",
                                tag_keys=("tier",))
        self.answers = Counter(PREFIX + "answers", description="Answers served, by the tier that answered and "
                               "how the route came about (hint | adapter | kept | escalated | fallback).",
                               tag_keys=("tier", "route"))
        self.escalations = Counter(PREFIX + "escalations", description="Edge probes the policy escalated to the "
                                   "cloud, by the confidence signal past its threshold.", tag_keys=("reason",))
        self.tokens = Counter(PREFIX + "generated_tokens", description="Tokens generated in answers, by tier.",
                              tag_keys=("tier",))
        self.generation_s = Counter(PREFIX + "generation_seconds", description="Seconds tiers spent generating "
                                    "answers; rate(tokens) / rate(seconds) is tokens/s.", tag_keys=("tier",))
        self.request_s = Histogram(PREFIX + "request_seconds", description="Routed request latency at the router, "
                                   "by the answering tier.", boundaries=LATENCY_BUCKETS, tag_keys=("tier",))
        self.ttft_s = Histogram(PREFIX + "time_to_first_token_seconds", description="Streamed requests: seconds "
                                "from the request reaching the router to its first text chunk, by answering tier.",
                                boundaries=LATENCY_BUCKETS, tag_keys=("tier",))
        self.in_flight = Gauge(PREFIX + "queue_depth", description="Requests in flight: per tier, those the router "
                               "has sent and not seen finish; 'ingress': waiting for admission.", tag_keys=("tier",))
        self.swaps = Counter(PREFIX + "swaps", description="Hot swaps to a newer knowledge version, by tier and "
                             "adapter.", tag_keys=("tier", "adapter"))
        self._depth: dict[str, int] = {}

    # ------------------------------------------------------------------------------ routing
    def asked(self, tier: str) -> None:
        self.requests.inc(tags={"tier": tier})

    def answered(self, tier: str, route: str, tokens: int, generation_s: float, request_s: float) -> None:
        self.answers.inc(tags={"tier": tier, "route": route})
        if tokens:
            self.tokens.inc(tokens, tags={"tier": tier})
        if generation_s > 0:
            self.generation_s.inc(generation_s, tags={"tier": tier})
        self.request_s.observe(request_s, tags={"tier": tier})

    def escalated(self, reason: str) -> None:
        self.escalations.inc(tags={"reason": reason})

    def first_token(self, tier: str, seconds: float) -> None:
        self.ttft_s.observe(seconds, tags={"tier": tier})

    # ------------------------------------------------------------------------------- queues
    def depth(self, tier: str, delta: int) -> None:
        self._depth[tier] = max(0, self._depth.get(tier, 0) + delta)
        self.in_flight.set(self._depth[tier], tags={"tier": tier})

    def set_depth(self, tier: str, value: int) -> None:
        self._depth[tier] = value
        self.in_flight.set(value, tags={"tier": tier})

    @contextmanager
    def running(self, tier: str):
        self.depth(tier, +1)
        try:
            yield
        finally:
            self.depth(tier, -1)

    # ---------------------------------------------------------------------------- replicas
    def swapped(self, tier: str, adapter: str) -> None:
        self.swaps.inc(tags={"tier": tier, "adapter": adapter})


def escalation_reason(decision) -> str:
    """The low-cardinality label of an escalation: the policy's signal name (``RouteDecision.signal``
    when the policy sets one), else read off the reason it wrote."""
    signal = getattr(decision, "signal", None)
    if signal:
        return str(signal)
    reason = decision.reason
    for name, words in (("mean_entropy", ("entropy",)), ("min_token_prob", ("probability", "min_token_prob")),
                        ("calibrated_never", ("never matches",))):
        if any(w in reason for w in words):
            return name
    return "other"
