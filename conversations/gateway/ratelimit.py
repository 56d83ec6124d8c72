"""Requests and tokens per minute, per key and per application, counted in
shared fixed one-minute windows so every worker sees the same totals.

Every counter of a request goes to Redis in one round trip, and the gateway
counts from the event loop (check_async): with a thread hop and a round trip
per counter, an application with rate limits cost the gateway four times the
CPU per request of one without (benchmarks/gateway_overhead.py --rate-limits).
A request is counted against every limit that applies, even when one of them
refuses it."""

import time
from dataclasses import dataclass

from conversations.gateway import shared
from conversations.gateway.errors import GatewayError

WINDOW_TTL_S = 70  # a minute's counters outlive their minute a little


@dataclass(frozen=True)
class Limit:
    scope: str  # "key" or "application"
    ident: int
    requests: int | None
    tokens: int | None


@dataclass(frozen=True)
class _Counter:
    key: str
    delta: int
    limit: Limit
    allowed: int
    what: str


def _counters(limits: list[Limit], tokens: int, minute: int) -> list[_Counter]:
    out = []
    for limit in limits:
        base = f"rl:{limit.scope}:{limit.ident}:{minute}"
        if limit.requests:
            out.append(_Counter(base + ":r", 1, limit, limit.requests, f"{limit.requests} requests per minute"))
        if limit.tokens:
            out.append(_Counter(base + ":t", tokens, limit, limit.tokens, f"{limit.tokens:,} tokens per minute"))
    return out


def _verdict(counters: list[_Counter], used: list[int], now: float) -> None:
    """Raise 429 with Retry-After for the first limit passed, in the limits' order."""
    for counter, count in zip(counters, used, strict=True):
        if count > counter.allowed:
            raise _refusal(counter.limit, counter.what, max(1, int(60 - now % 60) + 1))


def check(*, limits: list[Limit], tokens: int, now: float | None = None) -> None:
    """Count this request; raise 429 with Retry-After if any limit is passed."""
    now = now or time.time()
    counters = _counters(limits, tokens, int(now // 60))
    if counters:
        _verdict(counters, shared.incr_many([(c.key, c.delta) for c in counters], WINDOW_TTL_S), now)


async def check_async(*, limits: list[Limit], tokens: int, now: float | None = None) -> None:
    """check, from the event loop."""
    now = now or time.time()
    counters = _counters(limits, tokens, int(now // 60))
    if counters:
        _verdict(counters, await shared.incr_many_async([(c.key, c.delta) for c in counters], WINDOW_TTL_S), now)


def _refusal(limit: Limit, what: str, retry_after: int) -> GatewayError:
    who = "this API key" if limit.scope == "key" else "this application"
    return GatewayError(
        429,
        f"Rate limit reached for {who}: {what}. Retry after {retry_after} s.",
        "rate_limit_exceeded",
        type="rate_limit_error",
        param=None,
        headers={"Retry-After": str(retry_after)},
    )
