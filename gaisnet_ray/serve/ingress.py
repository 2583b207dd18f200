"""The ingress: the HTTP API (FastAPI under ``@serve.ingress``) and the tier router.

It composes the tiers through the ``DeploymentHandle``s passed to its constructor; which tier
answers is ``router.TierRouter``'s (the policy of ``gaisnet_ray.inference.routing``: an explicit tier
hint overrides; otherwise the edge starts with the adapter that knows the prompt's domain best, and
a low-confidence probe of its first tokens escalates to the cloud). Every answer says which tier
served it, why, and at which knowledge version; a stream says it in its first chunk, then sends
text as it is generated. The routing metrics (``metrics.py``) are recorded here. Errors are JSON in OpenAI's shape with a 4xx/5xx status (``failures.py``); a tier over its
queue limit gives 503 with Retry-After. Before a route runs, every request passes the gate
(``gate.py``): API key, admission (the ingress sheds load itself, so Serve's proxy never answers a
plain-text 503), body cap and read timeout, and the 500 guard that keeps tracebacks in the log.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at run time.
import asyncio
import logging
import time
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..inference.served import GLOBAL
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
from .errors import ServeError, internal_error, overloaded, unknown_model
from .failures import as_serve_error, install_error_handlers
from .gate import Admission, Gate, HttpPolicy, configure as configure_gate, request_id
from .playground import PAGE_HEADERS, page_html
from .router import Route, TierRouter
from .slots import BASE, GenerationRequest, TierAnswer

log = logging.getLogger(__name__)
api = FastAPI(title="gaisnet", description="Tiered inference over GaisNet's relayed knowledge")
api.add_middleware(Gate)  # request id + 500 guard, API key, admission, body cap (gate.py)
install_error_handlers(api)  # every other error: JSON in OpenAI's shape (failures.py)
HEALTH_TIMEOUT_S = 5.0
SESSION_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"


# ------------------------------------------------------------------------------------ router
@serve.deployment(name="ingress")
@serve.ingress(api)
class Router(TierRouter):
    def __init__(self, edge: DeploymentHandle, cloud: DeploymentHandle, end: DeploymentHandle, run_dir: str,
                 settings: dict, key_digests: list[str] | None = None):
        """``key_digests``: SHA-256 digests of the API keys (``auth.py``); none: no key needed."""
        super().__init__(edge, cloud, end, run_dir, settings)
        s = self.settings
        self.admission = Admission(s.ingress_max_ongoing_requests, s.ingress_max_queued_requests, s.retry_after_s)
        configure_gate(HttpPolicy(list(key_digests or []), s.max_body_bytes, s.split_max_payload_bytes,
                                  s.body_read_timeout_s, self.admission))
        for adapter, skipped in self._catalog.skipped.items():
            log.warning("serving '%s' at v%s; skipped as damaged: %s", adapter, self._catalog.versions.get(adapter),
                        "; ".join(skipped.values()))

    # ---------------------------------------------------------------------------- helpers
    def _request(self, prompt: str, max_new_tokens: int | None, param: str, temperature: float, top_p: float,
                 seed: int | None, stop, *, chat: bool = True, route_text: str | None = None) -> GenerationRequest:
        limit = self.settings.max_new_tokens
        n = self.settings.default_new_tokens if max_new_tokens is None else max_new_tokens
        if n > limit:
            raise ServeError(422, "invalid_field", f"field '{param}': {n} is over this server's limit of {limit}", param)
        a = self.admission
        self.metrics.set_depth("ingress", a.running + a.waiting)  # sampled as each generating request starts
        return GenerationRequest(prompt, n, temperature, top_p, seed, stop_list(stop), chat=chat, route_text=route_text)

    # ------------------------------------------------------------------------------ routes
    @api.get("/", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        """The playground page (``playground.py``): static, needs no key; its API calls send one."""
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

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
        await items.__anext__()  # the StreamStart: who answers is route.start
        s = route.start
        headers = tier_headers(s.tier, s.adapter, s.version, route.decision)
        events = self._sse(shape, req, route, items, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})

    async def _sse(self, shape: OpenAIShape, req: GenerationRequest, route: Route, items: AsyncIterator,
                   include_usage: bool) -> AsyncIterator[bytes]:
        """The first chunk carries ``gaisnet`` (the answering tier, known before any text: ``Route.head``),
        then text deltas as the tier generates them, then the final chunk with the whole ``gaisnet``."""
        final, first_text = None, True
        tier = route.start.tier
        with self.metrics.running(tier):
            try:
                yield sse(shape.chunk(None, first=True, gaisnet=route.head()))
                async for item in items:
                    if isinstance(item, TierAnswer):
                        final = item
                    elif item:
                        if first_text:
                            self.metrics.first_token(tier, time.perf_counter() - route.started)
                            first_text = False
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
        self.finished(req, route, final)
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

