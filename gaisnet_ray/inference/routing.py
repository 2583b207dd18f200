"""Tier routing as a pure policy: the edge answers first, low confidence escalates to the cloud,
an explicit tier hint overrides. Every decision carries its reason.

The confidence limit comes from the knowledge version that answered: ``routing.json`` (a
``RoutingTable``, written by ``inference.calibrate`` when the version is published) holds one
calibrated rule per domain. Versions without one, and domains it does not name, fall back to the
fixed ``serve.routing.*`` limits.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from .generate import Generation

TIERS = ("end", "edge", "cloud")
ROUTING_NAME = "routing.json"  # in a knowledge version folder, hash recorded in the lineage's 'files_sha256'
SIGNALS = ("min_token_prob", "mean_entropy")  # confidence signals a calibrated rule may use


@dataclass(frozen=True)
class CalibratedRule:
    """Keep the edge answer when ``signal`` is on the confident side of ``threshold``
    (``min_token_prob >= t``; ``mean_entropy <= t``); ``threshold`` None: always escalate."""

    signal: str
    threshold: float | None
    source: str = ""  # e.g. "edge-0 v0005, domain 'town'": named in decisions

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown confidence signal '{self.signal}': use one of {list(SIGNALS)}")

    def keeps(self, edge: Generation) -> bool:
        if self.threshold is None:
            return False
        if self.signal == "min_token_prob":
            return edge.min_token_prob >= self.threshold
        return edge.mean_entropy <= self.threshold


@dataclass(frozen=True)
class RoutingPolicy:
    max_mean_entropy: float = 2.5  # nats; above this the edge's answer is not trusted
    min_token_prob: float = 0.05  # below this for any emitted token, the edge is not trusted
    rule: CalibratedRule | None = None  # calibrated for the answering version and domain: replaces both


@dataclass(frozen=True)
class DomainCalibration:
    """One domain's calibrated rule and what calibration measured on its held-out examples."""

    signal: str
    threshold: float | None
    samples: int
    kept: int  # held-out answers the rule keeps at the edge
    edge_em: float  # the edge adapter's exact match on all of them
    cloud_em: float  # the cloud's
    tiered_em: float  # kept -> edge's answer, escalated -> cloud's


@dataclass(frozen=True)
class RoutingTable:
    """The calibrated routing of one adapter version: a rule per domain, and how it was made."""

    adapter: str
    version: int
    content_hash: str  # the adapter weights' content hash these thresholds were measured on
    objective: str
    domains: dict[str, DomainCalibration] = field(default_factory=dict)
    cloud: dict = field(default_factory=dict)  # what the cloud answered with (adapter, version)
    probe_tokens: int | None = None  # the signals were measured on the first k generated tokens (the probe)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RoutingTable:
        data = json.loads(text)
        domains = {d: DomainCalibration(**c) for d, c in data.pop("domains", {}).items()}
        return cls(**data, domains=domains)

    def rule(self, domain: str | None) -> CalibratedRule | None:
        cal = self.domains.get(domain) if domain is not None else None
        if cal is None:
            return None
        return CalibratedRule(cal.signal, cal.threshold, f"{self.adapter} v{self.version:04d}, domain '{domain}'")


def policy_for(table: RoutingTable | None, domain: str | None, fallback: RoutingPolicy) -> RoutingPolicy:
    """The answering version's calibrated rule for ``domain``, else ``fallback`` (serve.routing.*)."""
    rule = table.rule(domain) if table is not None else None
    if rule is None:
        return fallback
    return RoutingPolicy(fallback.max_mean_entropy, fallback.min_token_prob, rule)


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
    rule = policy.rule
    if rule is not None:
        value = getattr(edge, rule.signal)
        if rule.threshold is None:
            return RouteDecision("cloud", f"calibrated ({rule.source}): the edge never matches the cloud here",
                                 escalated=True)
        side = ">=" if rule.signal == "min_token_prob" else "<="
        if rule.keeps(edge):
            return RouteDecision("edge", f"edge confident: {rule.signal} {value:.3f} {side} calibrated "
                                         f"{rule.threshold:.3f} ({rule.source})")
        return RouteDecision("cloud", f"edge unsure: {rule.signal} {value:.3f} not {side} calibrated "
                                      f"{rule.threshold:.3f} ({rule.source})", escalated=True)
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
