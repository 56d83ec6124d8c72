"""Requests and tokens per minute, per key and per application, counted in
shared fixed one-minute windows so every worker sees the same totals."""

import time
from dataclasses import dataclass

from conversations.gateway import shared
from conversations.gateway.errors import GatewayError


@dataclass(frozen=True)
class Limit:
    scope: str  # "key" or "application"
    ident: int
    requests: int | None
    tokens: int | None


def check(*, limits: list[Limit], tokens: int, now: float | None = None) -> None:
    """Count this request; raise 429 with Retry-After if any limit is passed."""
    now = now or time.time()
    minute = int(now // 60)
    retry_after = max(1, int(60 - now % 60) + 1)
    for limit in limits:
        base = f"rl:{limit.scope}:{limit.ident}:{minute}"
        if limit.requests:
            used = shared.incr(base + ":r", 1, ttl=70)
            if used > limit.requests:
                raise _refusal(limit, f"{limit.requests} requests per minute", retry_after)
        if limit.tokens:
            used = shared.incr(base + ":t", tokens, ttl=70)
            if used > limit.tokens:
                raise _refusal(limit, f"{limit.tokens:,} tokens per minute", retry_after)


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
