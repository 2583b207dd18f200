"""The tier router: which tier answers a request, and asking it, over the tiers' ``DeploymentHandle``s.

Routing is the pure policy of ``gaisnet_ray.inference.routing``: an explicit tier hint overrides;
otherwise the edge answers first with the adapter that knows the prompt's domain best, and a
low-confidence answer escalates to the cloud (or, when the cloud is over its queue limit, the edge
answer is kept). ``TierRouter`` holds no HTTP: the ingress deployment (``ingress.Router``) is a
``TierRouter`` with the FastAPI routes on top, so the routing reads apart from the API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator

from ray.serve.handle import DeploymentHandle

from ..config import ServeSettings
from ..inference.routing import RouteDecision, RoutingPolicy, infer_domain, route_after_edge, route_hint
from ..inference.served import GLOBAL, ServedRun
from .api import DOMAIN_PREFIX, ROUTER_MODEL, RoutedAnswer
from .catalog import Catalog, read_catalog
from .errors import ServeError, unknown_model
from .failures import as_serve_error
from .slots import GenerationRequest, StreamStart, TierAnswer


async def _prepend(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


async def _replay(answer: TierAnswer) -> AsyncIterator:
    """An answer already generated (the edge's, kept by the router) as a stream: start, text, answer."""
    yield StreamStart(answer.tier, answer.adapter, answer.version)
    if answer.generation.text:
        yield answer.generation.text
    yield answer


@dataclass(frozen=True)
class Route:
    """A routing decision: the tier's handle to ask, or the edge answer already kept."""

    decision: RouteDecision
    domain: str | None
    handle: DeploymentHandle | None
    answered: TierAnswer | None = None  # the edge answer the router keeps (nothing more to ask)
    edge_attempt: TierAnswer | None = None  # the edge answer that was escalated


class TierRouter:
    """The routing half of the ingress: the tiers' handles, the routing policy and the run's catalog."""

    def __init__(self, edge: DeploymentHandle, cloud: DeploymentHandle, end: DeploymentHandle, run_dir: str,
                 settings: dict):
        self.edge, self.cloud, self.end = edge, cloud, end
        self.settings = s = ServeSettings.model_validate(settings)
        r = s.routing
        self.policy = RoutingPolicy(max_mean_entropy=r.max_mean_entropy, min_token_prob=r.min_token_prob)
        self.run = ServedRun(run_dir)
        self._catalog = read_catalog(self.run)

    # ---------------------------------------------------------------------------- helpers
    def catalog(self) -> Catalog:
        if time.monotonic() - self._catalog.read_at > self.settings.poll_interval_s:
            self._catalog = read_catalog(self.run)
        return self._catalog

    async def _call(self, response):
        try:
            return await response
        except Exception as e:
            err = as_serve_error(e, self.settings.retry_after_s)
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

    # ---------------------------------------------------------------------------- routing
    async def _decide(self, req: GenerationRequest, tier: str | None, domain: str | None,
                      adapter: str | None) -> Route:
        """Which tier answers and why. Without a hint or a pinned adapter the edge answers first
        (with the adapter that knows the prompt's domain best) and the policy judges its answer."""
        catalog = self.catalog()
        decision = self._plan(tier, adapter, catalog)
        domain = self._domain(req.route_text or req.prompt, domain, catalog)
        if decision is not None and decision.tier == "cloud":
            return Route(decision, domain, self.cloud)
        if decision is not None and decision.tier == "end":
            return Route(decision, domain, self.end)
        if adapter is not None:
            return Route(decision, domain, self.edge.options(multiplexed_model_id=adapter))
        edge_adapter, why = self._edge_adapter(domain, catalog)
        edge = self.edge.options(multiplexed_model_id=edge_adapter)
        if decision is not None:  # tier hint 'edge'
            return Route(RouteDecision("edge", f"{decision.reason}; {why}"), domain, edge)
        first = await self._call(edge.generate.remote(req))
        verdict = route_after_edge(first.generation, self.policy)
        if verdict.tier == "edge":
            return Route(RouteDecision("edge", f"{verdict.reason}; {why}"), domain, None, answered=first)
        return Route(RouteDecision("cloud", f"{verdict.reason}; {why}", escalated=True), domain, self.cloud,
                     edge_attempt=first)

    @staticmethod
    def _keep_edge(route: Route, err: ServeError) -> Route:
        """The cloud cannot take an escalated request (overload): the edge's answer is better than none."""
        reason = f"{route.decision.reason}; but the cloud is unavailable ({err.code}): kept the edge answer"
        return Route(RouteDecision("edge", reason), route.domain, None, answered=route.edge_attempt)

    async def route(self, req: GenerationRequest, *, tier: str | None, domain: str | None,
                    adapter: str | None) -> RoutedAnswer:
        route = await self._decide(req, tier, domain, adapter)
        if route.answered is not None:
            return RoutedAnswer(route.answered, route.decision, route.domain)
        try:
            answer = await self._call(route.handle.generate.remote(req))
        except ServeError as e:
            if e.status != 503 or route.edge_attempt is None:
                raise
            route = self._keep_edge(route, e)
            return RoutedAnswer(route.answered, route.decision, route.domain)
        return RoutedAnswer(answer, route.decision, route.domain, route.edge_attempt)

    async def route_stream(self, req: GenerationRequest, *, tier: str | None, domain: str | None,
                           adapter: str | None) -> tuple[Route, AsyncIterator]:
        """Decide the tier, then stream from it: ``StreamStart``, text deltas, the ``TierAnswer``. An edge
        answer the router keeps is already whole and goes out as one piece; a hinted tier or the cloud
        after an escalation streams token by token. Errors before the first token come out of this
        call (so they become a 4xx/5xx, not a broken 200 stream)."""
        route = await self._decide(req, tier, domain, adapter)
        if route.answered is not None:
            return route, _replay(route.answered)
        items = route.handle.options(stream=True).stream.remote(req)
        try:
            first = await items.__anext__()
        except StopAsyncIteration:
            raise ServeError(500, "empty_stream", "the tier ended the stream without an answer") from None
        except Exception as e:
            err = as_serve_error(e, self.settings.retry_after_s)
            if err is None:
                raise
            if err.status == 503 and route.edge_attempt is not None:
                route = self._keep_edge(route, err)
                return route, _replay(route.answered)
            raise err from None
        return route, _prepend(first, items)
