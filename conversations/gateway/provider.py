"""The upstream provider: one pooled httpx.AsyncClient per event loop and
base URL, and the translation of every way a provider can fail into a
GatewayError with a machine-readable code."""

import asyncio
import weakref
from dataclasses import dataclass

import httpx
import orjson
from django.conf import settings

from conversations.gateway.errors import GatewayError, upstream_error

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, httpx.AsyncClient]]" = (
    weakref.WeakKeyDictionary()
)


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


def client_for(base_url: str) -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    client = per_loop.get(base_url)
    if client is None or client.is_closed:
        cfg = settings.GATEWAY
        client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(cfg["PROVIDER_TIMEOUT_S"], connect=cfg["PROVIDER_CONNECT_TIMEOUT_S"]),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30),
            http2=False,
        )
        per_loop[base_url] = client
    return client


def build_request(upstream: Upstream, payload: dict, *, timeout: httpx.Timeout | None = None) -> httpx.Request:
    extra = {"timeout": timeout} if timeout is not None else {}
    return client_for(upstream.base_url).build_request(
        "POST",
        "/chat/completions",
        content=orjson.dumps(payload),
        headers={"Authorization": f"Bearer {upstream.api_key}", "Content-Type": "application/json"},
        **extra,
    )


def _provider_message(response: httpx.Response) -> str:
    try:
        err = orjson.loads(response.content).get("error") or {}
        return str(err.get("message") or "")[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def http_error(response: httpx.Response) -> GatewayError:
    """A non-2xx answer from the provider."""
    detail = _provider_message(response)
    status = response.status_code
    if status == 429:
        headers = {}
        if "retry-after" in response.headers:
            headers["Retry-After"] = response.headers["retry-after"]
        return upstream_error(
            429,
            "The provider is rate limiting this gateway. " + (detail or "Retry later."),
            "upstream_rate_limited",
            type="rate_limit_error",
            headers=headers,
        )
    if 400 <= status < 500 and status not in (401, 403, 404, 408):
        # The provider refused the request itself (e.g. context too long): the caller can act on it.
        return upstream_error(400, f"The provider rejected the request: {detail or status}", "upstream_invalid_request", type="invalid_request_error")
    if status in (401, 403):
        return upstream_error(502, "The gateway's provider credentials were refused by the provider.", "upstream_auth_failed")
    return upstream_error(502, f"The provider failed with HTTP {status}. {detail}".strip(), "upstream_error")


def transport_error(exc: Exception) -> GatewayError:
    if isinstance(exc, httpx.TimeoutException):
        return upstream_error(504, "The provider did not answer in time.", "upstream_timeout")
    if isinstance(exc, httpx.ConnectError):
        return upstream_error(502, "The provider could not be reached.", "upstream_unavailable")
    return upstream_error(
        502, f"The connection to the provider broke ({type(exc).__name__}).", "upstream_connection_error"
    )


def malformed(what: str) -> GatewayError:
    return upstream_error(502, f"The provider sent a malformed response: {what}.", "upstream_malformed_response")
