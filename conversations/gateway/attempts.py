"""Asking the provider: routes (the primary model, then the application's
fallbacks) tried in order, each with bounded retries, exponential backoff with
jitter that honours Retry-After, a circuit breaker per provider and model, and
one overall deadline that no retry or fallback outlives.

Every attempt is written down (route, outcome, latency, wait) for the call
record."""

import asyncio
import random
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from budgets.models import LanguageModel, ModelPrice
from conversations.gateway import breaker, provider
from conversations.gateway.errors import GatewayError, Outcome, Status, upstream_error

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class Route:
    model: LanguageModel
    price: ModelPrice
    upstream: provider.Upstream
    payload: dict
    fallback: bool = False

    @property
    def breaker_key(self) -> str:
        return breaker.key_for(self.upstream.base_url, self.model.provider_model)


@dataclass(frozen=True)
class Policy:
    deadline_s: float
    connect_timeout_s: float
    read_timeout_s: float
    max_retries: int
    backoff_ms: int
    backoff_max_ms: int

    @classmethod
    def for_application(cls, app) -> "Policy":
        return cls(
            deadline_s=float(app.request_deadline_s),
            connect_timeout_s=float(app.connect_timeout_s),
            read_timeout_s=float(app.read_timeout_s),
            max_retries=app.max_retries,
            backoff_ms=app.retry_backoff_ms,
            backoff_max_ms=app.retry_backoff_max_ms,
        )


@dataclass
class Sent:
    response: aiohttp.ClientResponse
    route: Route
    body: dict | None = None  # parsed chat completion (non-streaming)
    raw: bytes = b""  # the provider's bytes, relayed unchanged (non-streaming)


class AttemptsFailed(Exception):
    def __init__(self, err: GatewayError, reason: str):
        super().__init__(err.message)
        self.err = err
        self.reason = reason  # deadline_exceeded | provider_down | upstream_rejected


@dataclass
class Attempts:
    """The log of attempts for one call."""

    started: float
    items: list[dict] = field(default_factory=list)

    def add(self, route: Route, n: int, t0: float, outcome: str, **extra) -> None:
        self.items.append(
            {
                "n": len(self.items) + 1,
                "model": route.model.name,
                "provider": route.upstream.base_url,
                "retry": n,
                "at_ms": int((t0 - self.started) * 1000),
                "latency_ms": int((time.perf_counter() - t0) * 1000),
                "outcome": outcome,
                **extra,
            }
        )


def backoff_s(policy: Policy, retry: int, retry_after: float | None, rng=random) -> float:
    """Full jitter over an exponential ceiling, never shorter than Retry-After."""
    ceiling = min(policy.backoff_max_ms, policy.backoff_ms * (2**retry)) / 1000
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _parse(raw: bytes) -> dict:
    body = orjson.loads(raw)
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
        raise ValueError("no choices")
    return body


def _timeout(policy: Policy, remaining: float) -> aiohttp.ClientTimeout:
    return provider.timeout(
        connect_s=max(0.01, min(policy.connect_timeout_s, remaining)),
        read_s=max(0.01, min(policy.read_timeout_s, remaining)),
    )


async def send(*, routes: list[Route], policy: Policy, attempts: Attempts, stream: bool) -> Sent:
    deadline = attempts.started + policy.deadline_s
    last: GatewayError | None = None
    tried_any = False
    for route in routes:
        key = route.breaker_key
        if not breaker.allow(key):
            attempts.add(route, 0, time.perf_counter(), "breaker_open")
            continue
        for retry in range(policy.max_retries + 1):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise AttemptsFailed(_deadline_error(policy), "deadline_exceeded")
            tried_any = True
            t0 = time.perf_counter()
            retry_after = None
            raw = b""
            try:
                response = await provider.post(route.upstream, route.payload, limits=_timeout(policy, remaining))
                if not stream or response.status >= 400:
                    raw = await response.read()
            except provider.TRANSPORT_ERRORS as exc:
                err = provider.transport_error(exc)
                if provider.is_timeout(exc) and time.perf_counter() >= deadline - 0.01:
                    attempts.add(route, retry, t0, "timeout", code=err.code)
                    breaker.record(key, False)
                    raise AttemptsFailed(_deadline_error(policy), "deadline_exceeded") from None
                attempts.add(route, retry, t0, "error", code=err.code)
            else:
                if response.status < 400:
                    if stream:
                        attempts.add(route, retry, t0, "ok", status=response.status)
                        # Counted in process, shared within breaker.FLUSH_S: the
                        # answer waits for no Redis round trip. Failures (below)
                        # are counted at once: the next retry's allow() needs them.
                        breaker.count_success(key)
                        return Sent(response, route)
                    try:
                        body = _parse(raw)
                    except (orjson.JSONDecodeError, ValueError):
                        err = provider.malformed("the body is not a chat completion")
                        attempts.add(route, retry, t0, "malformed", status=response.status, code=err.code)
                    else:
                        attempts.add(route, retry, t0, "ok", status=response.status)
                        breaker.count_success(key)
                        return Sent(response, route, body, raw)
                else:
                    response.release()
                    err = provider.http_error(response.status, response.headers, raw)
                    retry_after = _retry_after(response)
                    attempts.add(route, retry, t0, f"http_{response.status}", status=response.status, code=err.code)
                    if response.status not in RETRYABLE_STATUS:
                        # The provider refused the request itself: another try or model won't change that.
                        raise AttemptsFailed(err, "upstream_rejected")
            breaker.record(key, False)
            last = err
            if retry == policy.max_retries or not breaker.allow(key):
                break
            delay = backoff_s(policy, retry, retry_after)
            if time.perf_counter() + delay >= deadline:
                attempts.items[-1]["gave_up"] = "backoff would pass the deadline"
                break
            attempts.items[-1]["wait_ms"] = int(delay * 1000)
            await asyncio.sleep(delay)
    if not tried_any:
        raise AttemptsFailed(
            upstream_error(
                503,
                "The provider is unavailable (circuit open for every configured model); nothing was sent.",
                "provider_unavailable",
                headers={"Retry-After": "5"},
            ),
            "provider_down",
        )
    if time.perf_counter() >= deadline:
        raise AttemptsFailed(_deadline_error(policy), "deadline_exceeded")
    raise AttemptsFailed(last, "provider_down")


def _deadline_error(policy: Policy) -> GatewayError:
    return upstream_error(
        504, f"No answer within the application's {policy.deadline_s:g} s deadline.", "deadline_exceeded"
    )


__all__ = ["Attempts", "AttemptsFailed", "Policy", "Route", "Sent", "send", "Outcome", "Status"]
