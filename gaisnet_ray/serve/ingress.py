"""The ingress: the HTTP API (FastAPI under ``@serve.ingress``) and the tier router.

It composes the tiers through the ``DeploymentHandle``s passed to its constructor. Routing is the
pure policy of ``gaisnet_ray.inference.routing``: an explicit tier hint overrides; otherwise the
edge answers first with the adapter that knows the prompt's domain best, and a low-confidence
answer escalates to the cloud. Every answer says which tier served it, why, and at which knowledge
version. Errors are JSON in OpenAI's shape with a 4xx/5xx status (``failures.py``); a tier over its
queue limit gives 503 with Retry-After. Before a route runs, every request passes the gate
(``gate.py``): API key, admission (the ingress sheds load itself, so Serve's proxy never answers a
plain-text 503), body cap and read timeout, and the 500 guard that keeps tracebacks in the log.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..inference.routing import RouteDecision, RoutingPolicy, infer_domain, route_after_edge, route_hint
from ..inference.served import GLOBAL, ServedRun
from .api import (
    DOMAIN_PREFIX,
    ROUTER_MODEL,
    SSE_DONE,
    ChatBody,
    CompletionBody,
    GenerateBody,
    OpenAIShape,
    RoutedAnswer,
    generate_response,
    sse,
    stop_list,
    tier_headers,
)
from .catalog import Catalog, read_catalog
from .errors import ServeError, internal_error, overloaded, unknown_model
from .failures import as_serve_error, install_error_handlers
from .gate import Admission, Gate, HttpPolicy, configure as configure_gate, request_id
from .settings import ServeSettings
from .slots import BASE, GenerationRequest, StreamStart, TierAnswer

log = logging.getLogger(__name__)
api = FastAPI(title="gaisnet", description="Tiered inference over GaisNet's relayed knowledge")
api.add_middleware(Gate)  # request id + 500 guard, API key, admission, body cap (gate.py)
install_error_handlers(api)  # every other error: JSON in OpenAI's shape (failures.py)
HEALTH_TIMEOUT_S = 5.0
SESSION_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"


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


# ------------------------------------------------------------------------------------ router
@serve.deployment(name="ingress")
@serve.ingress(api)
class Router:
    def __init__(self, edge: DeploymentHandle, cloud: DeploymentHandle, end: DeploymentHandle, run_dir: str,
                 settings: dict, key_digests: list[str] | None = None):
        """``key_digests``: SHA-256 digests of the API keys (``auth.py``); none: no key needed."""
        self.edge, self.cloud, self.end = edge, cloud, end
        self.settings = s = ServeSettings.model_validate(settings)
        r = s.routing
        self.policy = RoutingPolicy(max_mean_entropy=r.max_mean_entropy, min_token_prob=r.min_token_prob)
        self.run = ServedRun(run_dir)
        self._catalog = read_catalog(self.run)
        self.admission = Admission(s.ingress_max_ongoing_requests, s.ingress_max_queued_requests, s.retry_after_s)
        configure_gate(HttpPolicy(list(key_digests or []), s.max_body_bytes, s.split_max_payload_bytes,
                                  s.body_read_timeout_s, self.admission))
        for adapter, skipped in self._catalog.skipped.items():
            log.warning("serving '%s' at v%s; skipped as damaged: %s", adapter, self._catalog.versions.get(adapter),
                        "; ".join(skipped.values()))

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

    def _request(self, prompt: str, max_new_tokens: int | None, param: str, temperature: float, top_p: float,
                 seed: int | None, stop, *, chat: bool = True, route_text: str | None = None) -> GenerationRequest:
        limit = self.settings.max_new_tokens
        n = self.settings.default_new_tokens if max_new_tokens is None else max_new_tokens
        if n > limit:
            raise ServeError(422, "invalid_field", f"field '{param}': {n} is over this server's limit of {limit}", param)
        return GenerationRequest(prompt, n, temperature, top_p, seed, stop_list(stop), chat=chat, route_text=route_text)

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

    # ------------------------------------------------------------------------------ routes
    @api.get("/health")
    async def health(self) -> JSONResponse:
        catalog = self.catalog()
        tiers, ok = {}, True
        for name, handle in (("edge", self.edge), ("cloud", self.cloud), ("end", self.end)):
            try:
                tiers[name] = await asyncio.wait_for(self._call(handle.info.remote()), HEALTH_TIMEOUT_S)
            except (ServeError, asyncio.TimeoutError) as e:
                ok, tiers[name] = False, {"error": str(e) or type(e).__name__}
        body = {
            "status": "ok" if ok else "degraded",
            "run": self.run.run_dir.name,  # names relative to the run folder, never server paths
            "model": self.run.rel(self.run.model_dir),
            "base_version": catalog.versions.get(BASE),
            "knowledge_version": catalog.versions.get(GLOBAL),
            "served_version": (tiers.get("cloud") or {}).get("adapters_loaded", {}).get(GLOBAL),
            "adapters": catalog.versions,
            # newer versions not served because they fail verification: adapter -> {version: why}
            "skipped_versions": {a: {str(v): why for v, why in sk.items()} for a, sk in catalog.skipped.items()},
            "domain_adapters": catalog.domain_adapters,
            "ingress": self.admission.info(),
            "tiers": tiers,
        }
        if ok:
            return JSONResponse(body)
        err = overloaded("a tier is not answering", self.settings.retry_after_s)
        err.code = "degraded"
        return JSONResponse({**body, **err.body()}, status_code=503, headers=err.headers)

    @api.get("/v1/models")
    async def models(self) -> dict:
        c = self.catalog()
        created = int(self.run.model_dir.stat().st_mtime)

        def entry(model_id: str, **info) -> dict:
            return {"id": model_id, "object": "model", "created": created, "owned_by": "gaisnet", "gaisnet": info}

        data = [entry(ROUTER_MODEL, kind="router", tiers=["edge", "cloud"], version=c.versions.get(GLOBAL),
                      description="edge first with the domain's adapter; low confidence escalates to the cloud")]
        data += [entry(DOMAIN_PREFIX + d, kind="domain", domain=d, adapter=c.domain_adapters.get(d, GLOBAL))
                 for d in c.domains]
        data.append(entry(BASE, kind="base", tier="edge", path=self.run.rel(self.run.latest_base_dir()),
                          version=c.versions.get(BASE)))
        for a in c.adapters:
            if a != BASE:
                best = sorted(d for d, e in c.domain_adapters.items() if e == a)
                data.append(entry(a, kind="adapter", tier="edge", version=c.versions[a], best_for_domains=best))
        return {"object": "list", "data": data}

    @api.post("/v1/generate")
    async def generate(self, body: GenerateBody) -> JSONResponse:
        req = self._request(body.prompt, body.max_new_tokens, "max_new_tokens", body.temperature, body.top_p,
                            body.seed, body.stop)
        routed = await self.route(req, tier=body.tier, domain=body.domain, adapter=body.adapter)
        return JSONResponse(generate_response(routed), headers=routed.headers())

    @api.post("/v1/completions")
    async def completions(self, body: CompletionBody) -> Response:
        prompt = body.prompt_text()
        return await self._openai("completion", body, prompt, body.max_tokens, "max_tokens", prompt)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody) -> Response:
        prompt = body.prompt_text(self.run.tokenizer, self.run.system_prompt)
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        return await self._openai("chat", body, prompt, body.new_tokens, param, body.last_user_text())

    async def _openai(self, kind: Literal["completion", "chat"], body, prompt: str, new_tokens: int | None,
                      param: str, route_text: str) -> Response:
        """``prompt`` is raw text the model reads as is: a completion prompt, or the conversation
        rendered by the tokenizer's chat template; ``route_text`` is what the domain is inferred from."""
        catalog = self.catalog()
        adapter, domain = self._resolve_model(body.model, body.domain, catalog)
        temperature = 1.0 if body.temperature is None else body.temperature
        req = self._request(prompt, new_tokens, param, temperature, body.top_p or 1.0, body.seed, body.stop,
                            chat=False, route_text=route_text)
        shape = OpenAIShape(kind, body.model)
        if not body.stream:
            routed = await self.route(req, tier=body.tier, domain=domain, adapter=adapter)
            return JSONResponse(shape.response(routed), headers=routed.headers())
        route, items = await self.route_stream(req, tier=body.tier, domain=domain, adapter=adapter)
        start = await items.__anext__()
        if not isinstance(start, StreamStart):
            raise ServeError(500, "bad_stream", f"a tier stream began with {type(start).__name__}, not StreamStart")
        headers = tier_headers(start.tier, start.adapter, start.version, route.decision)
        events = self._sse(shape, route, items, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    async def _sse(self, shape: OpenAIShape, route: Route, items: AsyncIterator,
                   include_usage: bool) -> AsyncIterator[bytes]:
        final = None
        try:
            if shape.kind == "chat":
                yield sse(shape.chunk(None, first=True))
            async for item in items:
                if isinstance(item, TierAnswer):
                    final = item
                elif item:
                    yield sse(shape.chunk(item))
        except Exception as e:  # after the 200 header: the error goes into the stream, then it ends
            err = as_serve_error(e, self.settings.retry_after_s)
            if err is None:  # a bug: the traceback goes to the log, the client gets the request id
                log.exception("request %s: stream failed", request_id())
                err = internal_error(request_id())
            else:
                log.warning("request %s: stream failed: %s", request_id(), err)
            yield sse(err.body())
            yield SSE_DONE
            return
        if final is None:
            yield sse(ServeError(500, "empty_stream", "the tier ended the stream without an answer").body())
            yield SSE_DONE
            return
        routed = RoutedAnswer(final, route.decision, route.domain, route.edge_attempt)
        yield sse(shape.chunk(None, finish_reason=final.generation.finish_reason, gaisnet=routed.gaisnet()))
        if include_usage:
            yield sse(shape.usage_chunk(final.generation))
        yield SSE_DONE

    # ---------------------------------------------------------------------- split inference
    @api.get("/v1/split/info")
    async def split_info(self, adapter: str = Query(GLOBAL)) -> dict:
        catalog = self.catalog()
        if adapter not in catalog.adapters:
            raise unknown_model(adapter, catalog.adapters, param="adapter")
        return await self._call(self.edge.options(multiplexed_model_id=adapter).split_info.remote())

    @api.post("/v1/split/forward")
    async def split_forward(
        self,
        request: Request,
        out: Literal["logits", "token"] = Query("logits"),
        session: str = Header(alias="x-gaisnet-session", pattern=SESSION_PATTERN),
        past_len: int = Header(alias="x-gaisnet-past-len", ge=0),
        version: int | None = Header(None, alias="x-gaisnet-version", ge=0),
        adapter: str = Header(GLOBAL, alias="x-gaisnet-adapter"),
    ) -> Response:
        """The rest of the model for a device that runs the front: body = safetensors bytes of the
        hidden state (1, T, H); answer = the last position's logits (safetensors bytes, ``out=logits``)
        or the greedy token as JSON (``out=token``). Headers carry the session, the positions the
        device believes are cached, and the knowledge version its front runs. The gate has already
        capped the body at ``serve.split_max_payload_bytes``."""
        payload = await request.body()
        if not payload:
            raise ServeError(400, "bad_payload", "empty body: send the hidden state as safetensors bytes", "body")
        catalog = self.catalog()
        if adapter not in catalog.adapters:
            raise unknown_model(adapter, catalog.adapters, param="x-gaisnet-adapter")
        handle = self.edge.options(multiplexed_model_id=adapter)
        result = await self._call(handle.split_forward.remote(session, past_len, version, payload, out))
        headers = {"x-gaisnet-past-len": str(result["past_len"]), "x-gaisnet-adapter": result["adapter"],
                   "x-gaisnet-version": "" if result["version"] is None else str(result["version"]),
                   "x-gaisnet-tier": "edge"}
        if out == "token":
            return JSONResponse({k: v for k, v in result.items() if k != "logits"}, headers=headers)
        return Response(result["logits"], media_type="application/octet-stream", headers=headers)

    @api.delete("/v1/split/sessions/{session}")
    async def close_split_session(self, session: str) -> dict:
        if not await self._call(self.edge.close_session.remote(session)):
            raise ServeError(404, "unknown_session", f"split session '{session}' is not open", "session")
        return {"closed": session}

