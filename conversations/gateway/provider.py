"""The upstream provider: one pooled aiohttp session per event loop and base
URL, and the translation of every way a provider can fail into a
GatewayError with a machine-readable code.

aiohttp rather than httpx on this leg: httpcore's pool re-scans every pooled
connection for every queued request, which at 200 in-flight calls spent ~85 %
of the gateway's CPU (docs/performance.md)."""

import asyncio
import contextlib
import contextvars
import weakref
from dataclasses import dataclass

import aiohttp
import orjson
from django.conf import settings

from conversations.gateway.errors import GatewayError, upstream_error

_sessions: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aiohttp.ClientSession]]" = (
    weakref.WeakKeyDictionary()
)

# Everything the provider leg can raise on the wire.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class Upstream:
    base_url: str
    api_key: str

    @classmethod
    def for_application(cls, app, *, base_url: str = "", api_key: str = "") -> "Upstream":
        """The application's provider, or a fallback route's own override."""
        return cls(
            base_url=(base_url or app.provider_base_url or settings.OPENAI_BASE_URL).rstrip("/"),
            api_key=api_key or app.provider_api_key or settings.OPENAI_API_KEY,
        )


_ephemeral: contextvars.ContextVar[list | None] = contextvars.ContextVar("ephemeral_sessions", default=None)


@contextlib.asynccontextmanager
async def ephemeral_sessions():
    """Sessions opened inside this block are closed when it ends: for calls
    made on a short-lived event loop (the native API's async_to_sync), where a
    pooled session would outlive its loop."""
    opened: list[aiohttp.ClientSession] = []
    token = _ephemeral.set(opened)
    try:
        yield
    finally:
        _ephemeral.reset(token)
        for session in opened:
            await session.close()


def session_for(base_url: str) -> aiohttp.ClientSession:
    ephemeral = _ephemeral.get()
    if ephemeral is not None:
        session = aiohttp.ClientSession()
        ephemeral.append(session)
        return session
    loop = asyncio.get_running_loop()
    per_loop = _sessions.setdefault(loop, {})
    session = per_loop.get(base_url)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=1000, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        per_loop[base_url] = session
    return session


async def close_sessions() -> None:
    """Close this event loop's pooled sessions (at server shutdown), so their
    connections end cleanly instead of being reported unclosed at exit."""
    per_loop = _sessions.pop(asyncio.get_running_loop(), {})
    for session in per_loop.values():
        await session.close()


def timeout(*, connect_s: float, read_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, connect=connect_s, sock_connect=connect_s, sock_read=read_s)


async def post(upstream: Upstream, payload: dict, *, limits: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
    return await session_for(upstream.base_url).post(
        upstream.base_url + "/chat/completions",
        data=orjson.dumps(payload),
        headers={"Authorization": f"Bearer {upstream.api_key}", "Content-Type": "application/json"},
        timeout=limits,
    )


def _provider_message(content: bytes) -> str:
    try:
        err = orjson.loads(content).get("error") or {}
        return str(err.get("message") or "")[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def http_error(status: int, headers, content: bytes) -> GatewayError:
    """A non-2xx answer from the provider."""
    detail = _provider_message(content)
    if status == 429:
        extra = {}
        if "retry-after" in headers:
            extra["Retry-After"] = headers["retry-after"]
        return upstream_error(
            429,
            "The provider is rate limiting this gateway. " + (detail or "Retry later."),
            "upstream_rate_limited",
            type="rate_limit_error",
            headers=extra,
        )
    if 400 <= status < 500 and status not in (401, 403, 404, 408):
        # The provider refused the request itself (e.g. context too long): the caller can act on it.
        return upstream_error(400, f"The provider rejected the request: {detail or status}", "upstream_invalid_request", type="invalid_request_error")
    if status in (401, 403):
        return upstream_error(502, "The gateway's provider credentials were refused by the provider.", "upstream_auth_failed")
    return upstream_error(502, f"The provider failed with HTTP {status}. {detail}".strip(), "upstream_error")


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.TimeoutError)  # aiohttp's ServerTimeoutError/ConnectionTimeoutError included


def transport_error(exc: BaseException) -> GatewayError:
    if is_timeout(exc):
        return upstream_error(504, "The provider did not answer in time.", "upstream_timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return upstream_error(502, "The provider could not be reached.", "upstream_unavailable")
    return upstream_error(
        502, f"The connection to the provider broke ({type(exc).__name__}).", "upstream_connection_error"
    )


def malformed(what: str) -> GatewayError:
    return upstream_error(502, f"The provider sent a malformed response: {what}.", "upstream_malformed_response")
