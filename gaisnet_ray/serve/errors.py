"""Errors of the serving layer as data: a status, a machine-readable code, a message naming the cause.

Raised in a tier replica, a ``ServeError`` pickles with its payload, crosses the handle call and is
turned into the JSON body by the ingress (OpenAI's error shape, so OpenAI clients raise the right
exception class). No Ray import here.
"""

from __future__ import annotations

import math
import socket


class ServeError(Exception):
    """An HTTP-facing failure: ``status`` 4xx/5xx, ``code`` (e.g. ``unknown_model``), ``message``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, code, message, param, headers)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 503:
            kind = "overloaded_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def unknown_model(name: str, known: list[str], param: str = "model") -> ServeError:
    return ServeError(404, "unknown_model", f"unknown model or adapter '{name}': served are {known}", param)


def prompt_too_long(prompt_tokens: int, limit: int, param: str = "prompt") -> ServeError:
    return ServeError(413, "prompt_too_long", f"prompt has {prompt_tokens} tokens; the limit is {limit}", param)


def overloaded(message: str, retry_after_s: float) -> ServeError:
    return ServeError(503, "overloaded", f"{message}; retry after {retry_after_s:g} s", None,
                      {"Retry-After": str(max(0, math.ceil(retry_after_s)))})


def internal_error(request_id: str) -> ServeError:
    """What a client sees of a bug: a generic message and the request id the server log files it under."""
    return ServeError(500, "internal_error", f"internal server error; the server log has the details under request id "
                                             f"{request_id}")


def unauthorized(message: str) -> ServeError:
    return ServeError(401, "invalid_api_key", message, None, {"WWW-Authenticate": "Bearer"})


def payload_too_large(size: int | str, limit: int, what: str = "request body") -> ServeError:
    return ServeError(413, "payload_too_large", f"{what} of {size} bytes; the limit is {limit}", "body",
                      {"Connection": "close"})


class PortInUseError(OSError):
    """The HTTP address to serve on is taken; raised before anything starts."""


def check_port_free(host: str, port: int) -> None:
    """Fail fast, naming the address, instead of a Serve proxy that retries binding forever."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            raise PortInUseError(f"cannot serve on {host}:{port}: {e.strerror or e}; "
                                 f"choose another with --port or --set serve.port=...") from None
