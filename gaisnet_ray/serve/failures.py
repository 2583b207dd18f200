"""Failures as HTTP answers: FastAPI's exception handlers and the mapping of downstream (tier)
failures to ``ServeError``s. Every answer is JSON in OpenAI's error shape; an exception nobody
expected is not handled here but by the gate (``gate.py``): a generic 500 with a request id.
"""

# No `from __future__ import annotations`: FastAPI reads the handler signatures at run time.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServeError, overloaded


def error_response(err: ServeError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
    return error_response(exc)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    for e in errors:
        if e["type"] == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", e["msg"])
            return error_response(ServeError(400, "malformed_json", f"request body is not valid JSON: {detail}"))
    parts, first = [], None
    for e in errors:
        loc = [str(p) for p in e["loc"] if p not in ("body", "query", "header", "path")]
        name = ".".join(loc) or "body"
        first = first or name
        parts.append(f"field '{name}': {e['msg']}")
    code = "missing_field" if errors and all(e["type"] == "missing" for e in errors) else "invalid_field"
    return error_response(ServeError(422, code, "; ".join(parts), first))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(ServeError(exc.status_code, code, message, headers=dict(exc.headers or {})))


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(ServeError, _serve_error)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(StarletteHTTPException, _http_error)


def as_serve_error(exc: BaseException, retry_after_s: float) -> ServeError | None:
    """A downstream failure as the HTTP error it means (None: a bug; the gate makes it a generic 500)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a ServeError may come wrapped twice (end tier -> edge tier)
        if seen is None:
            return None
        if isinstance(seen, RayTaskError):
            seen = seen.cause
            continue
        if isinstance(seen, ServeError):
            return ServeError(seen.status, seen.code, seen.message, seen.param, seen.headers)
        if isinstance(seen, BackPressureError):
            return overloaded(f"a tier is at its queue limit ({seen.message})", retry_after_s)
        if isinstance(seen, (DeploymentUnavailableError, RayActorError)):
            err = overloaded(f"a tier is unavailable: {type(seen).__name__}", retry_after_s)
            err.code = "tier_unavailable"
            return err
        seen = seen.__cause__
    return None
