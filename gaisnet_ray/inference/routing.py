"""Tier routing as a pure, configurable policy: the edge answers first, low confidence escalates
to the cloud, an explicit tier hint overrides. Every decision carries its reason."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .generate import Generation

TIERS = ("end", "edge", "cloud")


@dataclass(frozen=True)
class RoutingPolicy:
    max_mean_entropy: float = 2.5  # nats; above this the edge's answer is not trusted
    min_token_prob: float = 0.05  # below this for any emitted token, the edge is not trusted


@dataclass(frozen=True)
class RouteDecision:
    tier: str  # "edge" | "cloud" | "end"
    reason: str
    escalated: bool = False


def route_hint(tier_hint: str | None) -> RouteDecision | None:
    """An explicit tier hint overrides the policy; None when there is no hint."""
    if tier_hint is None:
        return None
    if tier_hint not in TIERS:
        raise ValueError(f"unknown tier hint '{tier_hint}': use one of {list(TIERS)}")
    return RouteDecision(tier_hint, f"tier hint '{tier_hint}'")


def route_after_edge(edge: Generation, policy: RoutingPolicy) -> RouteDecision:
    """Keep a confident edge answer; escalate to the cloud naming the signal past its threshold."""
    if edge.mean_entropy > policy.max_mean_entropy:
        return RouteDecision("cloud", f"edge mean token entropy {edge.mean_entropy:.3f} > "
                                      f"{policy.max_mean_entropy}", escalated=True)
    if edge.min_token_prob < policy.min_token_prob:
        return RouteDecision("cloud", f"edge lowest token probability {edge.min_token_prob:.3f} < "
                                      f"{policy.min_token_prob}", escalated=True)
    return RouteDecision("edge", f"edge confident (mean entropy {edge.mean_entropy:.3f} <= "
                                 f"{policy.max_mean_entropy}, lowest token prob {edge.min_token_prob:.3f} >= "
                                 f"{policy.min_token_prob})")


# The built-in domains' prompt shapes (gaisnet_ray.data.domains); user domains are named explicitly.
_DOMAIN_PATTERNS = {
    "arithmetic": re.compile(r"^\s*\d+\s*[-+*]\s*\d+\s*=\s*$"),
    "units": re.compile(r"^\s*\d+\s+\w+\s+in\s+\w+\s*=\s*$"),
    "strings": re.compile(r"^\s*(rev|up|len)\s+[a-z]+\s*=\s*$"),
    "facts": re.compile(r"^\s*(cap|sym|opp)\s+\S.*=\s*$"),
    # the real model's built-in domains: natural questions (gaisnet_ray.data.records / skills / capitals)
    "codes": re.compile(r"\b(code|error)\s+E\d{3}\b", re.I),
    "town": re.compile(r"\b(mayor|founded|founding year|established|river|twin town|twinned)\b", re.I),
    "catalogue": re.compile(r"\b(price|cost|sell for|pay for|colou?r|aisle|warehouse|weigh|weight|heavy)\b", re.I),
    "addition": re.compile(r"^\s*What is \d+\s*\+\s*\d+\?\s*$", re.I),
    "conversion": re.compile(r"^\s*How many \w+ are in \d+ \w+\?\s*$", re.I),
    "capitals": re.compile(r"\bcapital of\b", re.I),
}


def infer_domain(prompt: str, domains: list[str]) -> str | None:
    """The built-in domain whose prompt shape ``prompt`` has, among ``domains``; None if none fits."""
    for domain in domains:
        pattern = _DOMAIN_PATTERNS.get(domain)
        if pattern is not None and pattern.search(prompt):
            return domain
    return None
