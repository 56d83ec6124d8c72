"""The bot's OpenAI-compatible endpoints (/v1/) as a plain ASGI application.

Why not Django's ASGIHandler here: for every request it sends the
request_started/request_finished signals, whose receivers are synchronous, so
each request started a thread (asgiref's per-request executor) and made two
thread hops before any gateway work; that was about a fifth of the gateway's
CPU. /v1/ needs none of it: no sessions, templates, or database connection on
the event loop's thread (the gateway's database work runs on its own threads,
conversations/gateway/dbsection.py). The views and the pipeline are unchanged:
they see a request with `method`, `META`, `body` and `request_id`, and return
Django response objects, which this module writes out.

Everything else (admin, native API, health) still goes through Django's handler.
"""

import asyncio
from contextlib import aclosing

import structlog
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import StreamingHttpResponse

from config.middleware import request_id_from
from conversations.gateway.errors import GatewayError

log = structlog.get_logger("gateway")


class GatewayRequest:
    """What the /v1/ views read from a request, in Django's spelling."""

    __slots__ = ("method", "path", "META", "_body", "request_id")

    def __init__(self, scope: dict):
        self.method = scope["method"]
        self.path = scope["path"]
        meta = {"REQUEST_METHOD": self.method, "PATH_INFO": self.path, "QUERY_STRING": scope.get("query_string", b"").decode("latin1")}
        for name, value in scope.get("headers") or ():
            key = name.decode("latin1").upper().replace("-", "_")
            if key not in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                key = "HTTP_" + key
            value = value.decode("latin1")
            meta[key] = f"{meta[key]},{value}" if key in meta else value
        client = scope.get("client")
        if client:
            meta["REMOTE_ADDR"] = client[0]
        self.META = meta
        self._body: bytes | None = b""
        self.request_id = request_id_from(meta)

    @property
    def body(self) -> bytes:
        if self._body is None:
            raise RequestDataTooBig("Request body exceeded the gateway's limit.")
        return self._body


async def _read_body(request: GatewayRequest, receive) -> bool:
    """Read the body, keeping at most the configured limit in memory (a larger
    one is drained and dropped; the view answers 413). False if the client left."""
    limit = settings.GATEWAY["MAX_BODY_BYTES"]
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        chunk = message.get("body", b"")
        if chunk and size <= limit:
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        if not message.get("more_body", False):
            break
    request._body = b"".join(chunks) if size <= limit else None
    return True


class FinalPart(bytes):
    """A stream's last part: written together with the end of the body (one
    socket write, and one read for the client, instead of two)."""


class StreamResponse(StreamingHttpResponse):
    """A streaming response whose parts reach _send as they were yielded, so a
    FinalPart keeps its type (Django's make_bytes copies bytes into bytes)."""

    def make_bytes(self, value):
        return value if isinstance(value, FinalPart) else super().make_bytes(value)


async def _send(response, send) -> None:
    headers = [
        (name.encode("ascii") if isinstance(name, str) else name, value.encode("latin1") if isinstance(value, str) else value)
        for name, value in response.items()
    ]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    if response.streaming:
        async with aclosing(aiter(response)) as content:
            async for part in content:
                if isinstance(part, FinalPart):
                    await send({"type": "http.response.body", "body": bytes(part)})
                    return
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body"})
    else:
        await send({"type": "http.response.body", "body": response.content})


async def _disconnected(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _not_found(request: GatewayRequest):
    return GatewayError(404, f"There is no endpoint {request.method} {request.path} on this gateway.", "not_found").response(
        request.request_id
    )


class GatewayApp:
    def __init__(self):
        from conversations.gateway import views

        self.routes = {"/v1/chat/completions": views.chat_completions, "/v1/models": views.list_models}

    async def __call__(self, scope, receive, send):
        request = GatewayRequest(scope)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        if not await _read_body(request, receive):
            return
        view = self.routes.get(request.path.rstrip("/")) or _not_found

        async def respond():
            try:
                response = await view(request) if view is not _not_found else _not_found(request)
            except asyncio.CancelledError:
                raise
            except Exception:  # the last line before the client: answer, and keep the stack in the log
                log.exception("gateway.unhandled_error")
                response = GatewayError(500, "The gateway failed unexpectedly; the error is logged with this request id.", "internal_error", type="api_error").response(request.request_id)
            response["X-Request-ID"] = request.request_id
            try:
                await _send(response, send)
            except OSError:
                pass  # the client went away while we wrote

        # A client that disconnects cancels the work in flight (the pipeline
        # records the call as cancelled and stops the provider call).
        listener = asyncio.ensure_future(_disconnected(receive))
        worker = asyncio.ensure_future(respond())
        await asyncio.wait((listener, worker), return_when=asyncio.FIRST_COMPLETED)
        for task in (listener, worker):
            if not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if worker.done() and not worker.cancelled() and worker.exception() is not None:
            log.error("gateway.response_failed", error=repr(worker.exception()))
