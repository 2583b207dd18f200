"""The tier router: which tier answers a request, and asking it, over the tiers' ``DeploymentHandle``s.

Routing is the pure policy of ``gaisnet_ray.inference.routing``: an explicit tier hint or a pinned
adapter decides at once; otherwise the edge starts with the adapter that knows the prompt's domain
best, and the policy judges its PROBE, the confidence of its first k tokens
(``serve.routing.probe_tokens``; the whole answer when shorter):

- kept: the probe's text goes out, then the rest of the same edge generation as it is produced;
- escalated: the cloud answers (streaming), and the edge generation is cancelled after its probe;
- escalated but the cloud cannot take it (overload): the edge generation goes on and answers.

Why a probe: a stream must say which tier answers in its first chunk, so the decision has to come
before any text, and waiting for the whole edge answer would make the edge's stream one late
chunk. k tokens are enough for the short answers of the built-in tasks (often the whole answer)
and cost the escalated request only k edge steps instead of a full edge answer. Streamed and
non-streamed requests decide the same way, on the same probe (a non-streamed request collects the
stream), so the tier never depends on ``stream``. ``TierRouter`` holds no HTTP: the ingress
deployment (``ingress.Router``) is a ``TierRouter`` with the FastAPI routes on top.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle

from ..config import ServeSettings
from ..inference.generate import Confidence, Generation
from ..inference.routing import RouteDecision, RoutingPolicy, infer_domain, policy_for, route_after_edge, route_hint
from ..inference.served import GLOBAL, ServedRun
from .api import DOMAIN_PREFIX, ROUTER_MODEL, RoutedAnswer, confidence
from .catalog import Catalog, read_catalog
from .errors import ServeError, unknown_model
from .escalations import hand_back, hand_back_kept
from .failures import as_serve_error
from .metrics import ServeMetrics, escalation_reason
from .slots import GenerationRequest, StreamStart, TierAnswer


@dataclass
class Route:
    """How a request is answered: the decision, the route kind (a ``metrics.ROUTES`` name), the
    edge's probe when the policy judged one, and when the request reached the router."""

    decision: RouteDecision
    domain: str | None
    kind: str
    start: StreamStart | None = None  # who answers (the first item of the answering tier's stream)
    edge_attempt: TierAnswer | None = None  # the edge's probe, when escalated (or kept on overload)
    edge_adapter: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def head(self) -> dict:
        """The ``gaisnet`` object of a stream's first chunk: who answers and why, known before any text."""
        s, e = self.start, self.edge_attempt
        attempt = None if e is None else {"adapter": e.adapter, "version": e.version, "text": e.generation.text,
                                          "confidence": confidence(e.generation)}
        return {"tier": s.tier, "reason": self.decision.reason, "escalated": self.decision.escalated,
                "adapter": s.adapter, "version": s.version, "domain": self.domain, "edge_attempt": attempt}


@dataclass
class Probe:
    """What the router read of the edge's stream before deciding: text deltas, and the confidence of
    the first k tokens, or the whole answer when it ended first."""

    deltas: list[str]
    confidence: Confidence | None = None
    answer: TierAnswer | None = None

    @property
    def signals(self) -> Confidence | Generation:
        return self.confidence if self.confidence is not None else self.answer.generation

    def as_attempt(self, start: StreamStart, elapsed_s: float) -> TierAnswer:
        """The probe as the escalated edge attempt the answer reports (its text and confidence)."""
        if self.answer is not None:
            return self.answer
        c = self.confidence
        gen = Generation("".join(self.deltas), [], "probe", 0, c.tokens, c.mean_entropy, c.min_token_prob)
        return TierAnswer(start.tier, start.adapter, start.version, gen, elapsed_s)


async def _items(start: StreamStart, head: list, rest: AsyncIterator | None) -> AsyncIterator:
    """A tier's stream as the ingress reads it: ``StreamStart``, text deltas, the ``TierAnswer``;
    ``Confidence`` items (the probe) stay inside the router."""
    yield start
    for item in head:
        yield item
    if rest is not None:
        async for item in rest:
            if not isinstance(item, Confidence):
                yield item


class TierRouter:
    """The routing half of the ingress: the tiers' handles, the routing policy and the run's catalog."""

    def __init__(self, edge: DeploymentHandle, cloud: DeploymentHandle, end: DeploymentHandle, run_dir: str,
                 settings: dict, metrics: ServeMetrics | None = None):
        self.edge, self.cloud, self.end = edge, cloud, end
        self.settings = s = ServeSettings.model_validate(settings)
        r = s.routing
        self.policy = RoutingPolicy(max_mean_entropy=r.max_mean_entropy, min_token_prob=r.min_token_prob)
        self.run = ServedRun(run_dir)
        self._catalog = read_catalog(self.run)
        self.metrics = metrics or ServeMetrics()

    # ---------------------------------------------------------------------------- helpers
    def catalog(self) -> Catalog:
        if time.monotonic() - self._catalog.read_at > self.settings.poll_interval_s:
            self._catalog = read_catalog(self.run)
        return self._catalog

    def _serve_error(self, e: BaseException) -> ServeError | None:
        return as_serve_error(e, self.settings.retry_after_s)

    async def _call(self, response):
        try:
            return await response
        except Exception as e:
            err = self._serve_error(e)
            if err is None:
                raise
            raise err from None

    def _domain(self, prompt: str, domain: str | None, catalog: Catalog) -> str | None:
        if domain is None:
            return infer_domain(prompt, catalog.domains)
        if domain not in catalog.domains:
            raise ServeError(404, "unknown_domain", f"unknown domain '{domain}': served domains are {catalog.domains}",
                             "domain")
        return domain

    def _edge_adapter(self, domain: str | None, catalog: Catalog) -> tuple[str, str]:
        if domain is None:
            return GLOBAL, "no domain recognised, global adapter"
        adapter = catalog.domain_adapters.get(domain)
        if adapter is None:
            return GLOBAL, f"domain '{domain}', no edge adapter specialises in it: global adapter"
        return adapter, f"domain '{domain}' -> adapter '{adapter}'"

    def _resolve_model(self, model: str, domain: str | None, catalog: Catalog) -> tuple[str | None, str | None]:
        """OpenAI ``model`` -> (pinned adapter or None for the router, domain)."""
        if model == ROUTER_MODEL:
            return None, domain
        if model.startswith(DOMAIN_PREFIX):
            d = model[len(DOMAIN_PREFIX):]
            if d not in catalog.domains:
                raise unknown_model(model, self.model_ids(catalog))
            return None, d
        if model in catalog.adapters:
            return model, domain
        raise unknown_model(model, self.model_ids(catalog))

    @staticmethod
    def model_ids(catalog: Catalog) -> list[str]:
        return [ROUTER_MODEL, *(DOMAIN_PREFIX + d for d in catalog.domains), *catalog.adapters]

    def _plan(self, tier: str | None, adapter: str | None, catalog: Catalog) -> RouteDecision | None:
        try:
            hint = route_hint(tier)
        except ValueError as e:
            raise ServeError(422, "invalid_field", f"field 'tier': {e}", "tier") from None
        if adapter is not None:
            if adapter not in catalog.adapters:
                raise unknown_model(adapter, catalog.adapters, param="adapter")
            if hint is not None and hint.tier != "edge":
                raise ServeError(422, "conflicting_fields",
                                 f"adapter '{adapter}' is served by the edge tier, but tier '{hint.tier}' was asked; "
                                 f"drop one of them", "tier")
            return RouteDecision("edge", f"adapter '{adapter}' requested")
        return hint

    def _policy(self, adapter: str, version: int | None, domain: str | None) -> RoutingPolicy:
        """The probed version's calibrated rule for the domain (its ``routing.json``), else serve.routing.*."""
        return policy_for(self.run.routing_table(adapter, version), domain, self.policy)

    # ---------------------------------------------------------------------------- streams
    async def _open(self, handle: DeploymentHandle, tier: str, req: GenerationRequest):
        """Ask ``tier`` for a stream and wait for its ``StreamStart`` (the prompt accepted). Errors before
        it come out of this call, mapped to ``ServeError`` (so they become a 4xx/5xx, not a broken 200)."""
        self.metrics.asked(tier)
        items = handle.options(stream=True).stream.remote(req)
        try:
            start = await items.__anext__()
        except StopAsyncIteration:
            raise ServeError(500, "empty_stream", f"the {tier} tier ended the stream without an answer") from None
        except Exception as e:
            err = self._serve_error(e)
            if err is None:
                raise
            raise err from None
        if not isinstance(start, StreamStart):
            raise ServeError(500, "bad_stream", f"a tier stream began with {type(start).__name__}, not StreamStart")
        return start, items

    @staticmethod
    async def _read_probe(items) -> Probe:
        probe = Probe([])
        async for item in items:
            if isinstance(item, Confidence):
                probe.confidence = item
                return probe
            if isinstance(item, TierAnswer):
                probe.answer = item
                return probe
            probe.deltas.append(item)
        raise ServeError(500, "empty_stream", "the edge tier ended the stream without an answer")

    async def _cascade(self, req: GenerationRequest, domain: str | None, catalog: Catalog,
                       route_started: float) -> tuple[Route, AsyncIterator]:
        """The edge probes; the policy keeps it (the edge streams on) or escalates (the cloud streams)."""
        edge_adapter, why = self._edge_adapter(domain, catalog)
        edge = self.edge.options(multiplexed_model_id=edge_adapter)
        k = self.settings.routing.probe_tokens
        start, edge_items = await self._open(edge, "edge", dataclasses.replace(req, probe_tokens=k))
        try:
            probe = await self._read_probe(edge_items)
        except Exception as e:
            err = self._serve_error(e)
            if err is None:
                raise
            raise err from None
        rest = None if probe.answer is not None else edge_items
        tail = probe.deltas + ([probe.answer] if probe.answer is not None else [])
        verdict = route_after_edge(probe.signals, self._policy(edge_adapter, start.version, domain))
        if verdict.tier == "edge":
            route = Route(RouteDecision("edge", f"{verdict.reason}; {why}"), domain, "kept", start,
                          edge_adapter=edge_adapter, started=route_started)
            return route, _items(start, tail, rest)
        attempt = probe.as_attempt(start, time.perf_counter() - route_started)
        decision = RouteDecision("cloud", f"{verdict.reason}; {why}", escalated=True)
        self.metrics.escalated(escalation_reason(verdict))
        try:
            cloud_start, cloud_items = await self._open(self.cloud, "cloud", req)
        except ServeError as e:
            if e.status != 503:
                if rest is not None:
                    rest.cancel()
                raise
            # The cloud cannot take it (overload): the edge's answer is better than none; it went on generating.
            reason = f"{decision.reason}; but the cloud is unavailable ({e.code}): kept the edge answer"
            route = Route(RouteDecision("edge", reason), domain, "fallback", start, attempt, edge_adapter,
                          route_started)
            return route, _items(start, tail, rest)
        if rest is not None:
            rest.cancel()  # the edge stops after its probe
        route = Route(decision, domain, "escalated", cloud_start, attempt, edge_adapter, route_started)
        return route, _items(cloud_start, [], cloud_items)

    # ---------------------------------------------------------------------------- routing
    def _direct(self, decision: RouteDecision, adapter: str | None, domain: str | None, catalog: Catalog,
                started: float) -> tuple[Route, DeploymentHandle]:
        """A tier hint or a pinned adapter: the tier to ask, no probe."""
        kind = "adapter" if adapter is not None else "hint"
        if decision.tier == "edge":
            if adapter is None:
                adapter, why = self._edge_adapter(domain, catalog)
                decision = RouteDecision("edge", f"{decision.reason}; {why}")
            handle = self.edge.options(multiplexed_model_id=adapter)
        else:
            handle = self.cloud if decision.tier == "cloud" else self.end
        return Route(decision, domain, kind, edge_adapter=adapter, started=started), handle

    async def route_stream(self, req: GenerationRequest, *, tier: str | None, domain: str | None,
                           adapter: str | None) -> tuple[Route, AsyncIterator]:
        """Decide the tier, then stream from it: ``StreamStart``, text deltas as generated, the
        ``TierAnswer``. The route (``Route.head()``) is known before the first text; errors before
        the first token come out of this call (so they become a 4xx/5xx, not a broken 200 stream)."""
        started = time.perf_counter()
        catalog = self.catalog()
        decision = self._plan(tier, adapter, catalog)
        domain = self._domain(req.route_text or req.prompt, domain, catalog)
        if decision is None:
            return await self._cascade(req, domain, catalog, started)
        route, handle = self._direct(decision, adapter, domain, catalog, started)
        route.start, items = await self._open(handle, decision.tier, req)
        return route, _items(route.start, [], items)

    async def route(self, req: GenerationRequest, *, tier: str | None, domain: str | None,
                    adapter: str | None) -> RoutedAnswer:
        """A whole answer. Policy-routed requests go through the same probe as ``route_stream`` (the
        stream, collected), so the tier never depends on ``stream``; a hint or a pinned adapter is one call."""
        started = time.perf_counter()
        catalog = self.catalog()
        decision = self._plan(tier, adapter, catalog)
        domain = self._domain(req.route_text or req.prompt, domain, catalog)
        if decision is None:
            route, items = await self._cascade(req, domain, catalog, started)
            with self.metrics.running(route.start.tier):
                answer = await self._collect(items)
        else:
            route, handle = self._direct(decision, adapter, domain, catalog, started)
            self.metrics.asked(decision.tier)
            with self.metrics.running(decision.tier):
                answer = await self._call(handle.generate.remote(req))
            route.start = StreamStart(answer.tier, answer.adapter, answer.version)
        self.finished(req, route, answer)
        return RoutedAnswer(answer, route.decision, route.domain, route.edge_attempt)

    async def _collect(self, items: AsyncIterator) -> TierAnswer:
        answer = None
        try:
            async for item in items:
                if isinstance(item, TierAnswer):
                    answer = item
        except Exception as e:
            err = self._serve_error(e)
            if err is None:
                raise
            raise err from None
        if answer is None:
            raise ServeError(500, "empty_stream", "the tier ended the stream without an answer")
        return answer

    def finished(self, req: GenerationRequest, route: Route, answer: TierAnswer) -> None:
        """A routed answer is complete: record it, and after an escalation hand the cloud's answer
        back to the edge that escalated (``serve.learn_from_escalations``; fire and forget)."""
        g = answer.generation
        self.metrics.answered(answer.tier, route.kind, g.completion_tokens, answer.elapsed_s,
                              time.perf_counter() - route.started)
        if route.kind == "escalated":
            hand_back(self.edge, self.settings, req, route.domain, route.edge_attempt, answer)
        elif route.kind == "kept":  # serve.learn.anchors: what the edge answered itself
            hand_back_kept(self.edge, self.settings, req, route.domain, answer)
