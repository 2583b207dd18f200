"""The gate every HTTP request passes before the API sees it (a pure ASGI middleware, no Ray):

1. a request id (Serve's proxy puts one in ``x-request-id`` and echoes it in the response; without
   the proxy the gate makes one and sets the header itself), and a guard that turns any exception
   the routes did not handle into a JSON 500 with a generic message and that id; the traceback goes
   to the server log only;
2. the API key (``auth.py``), for every route but ``auth.OPEN_ROUTES`` (``/health``, the page ``/``): 401 JSON;
3. admission: at most ``ingress_max_ongoing_requests`` requests run, ``ingress_max_queued_requests``
   wait; any more get a JSON 503 with ``Retry-After`` at once;
4. the body: 413 JSON when ``Content-Length`` is over the cap, else the body is read here in
   chunks, stopping at the cap (413) or at ``body_read_timeout_s`` (408), and handed to the route.

What Ray Serve's proxy allows (read in Ray 2.60, ``serve/_private/proxy.py``, ``http_util.py``): the
proxy's uvicorn takes the client's body and a task forwards every ``http.request`` message into an
unbounded in-memory queue, which this replica pulls from (``receive_asgi_messages``) as it calls
``receive()``; the proxy cancels that task once this replica's response is complete. So the replica
cannot stop the proxy from reading what a client sends while the request is open, and the proxy has
no body-size or body-read-timeout setting of its own (only ``request_timeout_s`` for a whole request
and ``keep_alive_timeout_s``); its ``http_options.middlewares`` hook, which would run in the proxy,
is deprecated. What the replica can do, and does here: answer 413 from ``Content-Length`` before any
body is pulled, stop pulling at the cap or the timeout, and answer with ``Connection: close`` so the
proxy's cancel ends the transfer; the proxy then buffers at most what arrived before the answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from .auth import OPEN_ROUTES, bearer_key, key_matches
from .errors import ServeError, internal_error, overloaded, payload_too_large, unauthorized

log = logging.getLogger(__name__)
REQUEST_ID = contextvars.ContextVar("gaisnet_request_id", default="-")
SPLIT_FORWARD = "/v1/split/forward"


def request_id() -> str:
    """The id of the request being served (what the log and a 500's message name)."""
    return REQUEST_ID.get()


class Admission:
    """At most ``limit`` requests run and ``queue`` wait; the next one is refused (``overloaded``)."""

    def __init__(self, limit: int, queue: int, retry_after_s: float):
        self.limit, self.queue, self.retry_after_s = limit, queue, retry_after_s
        self.running = self.waiting = self.shed = 0
        self._sem: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def slot(self):
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.limit)
        if self._sem.locked() and self.waiting >= self.queue:
            self.shed += 1
            raise overloaded(f"the server is at its limit of {self.limit} running and {self.queue} waiting requests",
                             self.retry_after_s)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()

    def info(self) -> dict:
        return {"running": self.running, "waiting": self.waiting, "limit": self.limit, "queue": self.queue,
                "shed": self.shed}


@dataclass
class HttpPolicy:
    """What the gate enforces; the ingress ``configure``s one when it starts."""

    key_digests: list[str] = field(default_factory=list)
    max_body_bytes: int = 2**20
    split_max_payload_bytes: int = 16 * 2**20
    body_read_timeout_s: float = 30.0
    admission: Admission = field(default_factory=lambda: Admission(64, 64, 1.0))

    def body_limit(self, path: str) -> tuple[int, str]:
        if path == SPLIT_FORWARD:
            return self.split_max_payload_bytes, "activation payload"
        return self.max_body_bytes, "request body"


# The policy of this process's ingress. Module state on purpose: Serve runs the FastAPI app it
# unpickles (not the module's ``api`` object, so ``api.state`` set in the ingress constructor is not
# what the served app sees), while this module is imported once per replica process by both the
# ingress and the middleware. One ingress replica per process.
_POLICY: list[HttpPolicy] = []


def configure(policy: HttpPolicy) -> None:
    """Set the policy the gate enforces in this process (the ingress constructor calls it)."""
    _POLICY[:] = [policy]


def current_policy() -> HttpPolicy:
    return _POLICY[0] if _POLICY else HttpPolicy()


class ClientGone(Exception):
    """The client disconnected before its body was complete: nothing to answer."""


async def read_body(receive, limit: int, timeout_s: float, what: str = "request body") -> bytes:
    """The whole body, pulled chunk by chunk: 413 past ``limit`` bytes, 408 when it is not complete
    ``timeout_s`` after the first pull (a client that sends part of a body and stalls)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise ServeError(408, "body_timeout", f"the {what} was not complete after {timeout_s:g} s "
                                                  f"({size} bytes received)", "body", {"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large(f"more than {limit}", limit, what)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def send_error(send, err: ServeError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """The ASGI middleware (``api.add_middleware(Gate)``); enforces ``current_policy()``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = current_policy()
        rid, own_id = _header(scope, b"x-request-id"), []
        if not rid:  # not behind Serve's proxy (which sets and echoes it): make one and echo it here
            rid = uuid.uuid4().hex
            own_id = [(b"x-request-id", rid.encode())]
        REQUEST_ID.set(rid)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if own_id:
                    message = {**message, "headers": [*message.get("headers", []), *own_id]}
            await send(message)

        try:
            await self._admit(scope, receive, tracked, policy)
        except ServeError as e:
            if not started:
                await send_error(tracked, e)
            else:
                log.warning("request %s: %s after its answer began; the answer is cut", rid, e)
        except ClientGone:
            log.info("request %s: the client left before its body was complete", rid)
        except Exception:
            log.exception("request %s failed: %s %s", rid, scope.get("method"), scope.get("path"))
            if not started:
                await send_error(tracked, internal_error(rid))

    async def _admit(self, scope, receive, send, policy: HttpPolicy) -> None:
        path = scope.get("path", "")
        if path in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        if policy.key_digests:
            key = bearer_key(_header(scope, b"authorization"))
            if not key_matches(key, policy.key_digests):
                raise unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'" if key is None
                                   else "the API key is not valid")
        limit, what = policy.body_limit(path)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise payload_too_large(int(declared), limit, what)
        async with policy.admission.slot():
            body = await read_body(receive, limit, policy.body_read_timeout_s, what)
            delivered = False

            async def replay():
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect, for streaming responses

            await self.app(scope, replay, send)
