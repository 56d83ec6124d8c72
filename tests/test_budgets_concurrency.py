"""Budgets hold under concurrency: 200 simultaneous requests through the real
gateway against a budget that allows 50 of them. Spend never passes the cap,
not by one request; the admitted are recorded with exact costs; the rest are
refused with 429 budget_exceeded; no hold is left behind."""

import asyncio
from decimal import Decimal

import httpx
import pytest
from django.db import connection

from budgets.models import BudgetPeriod, Reservation
from budgets.policy import worst_case
from budgets.selectors import cost_of, priced_model
from conversations.gateway.tokens import count_messages
from conversations.models import ProviderCall
from tests.budget_helpers import make_budget

# gpt-3.5-turbo counts with its own encoding (cl100k): the pre-flight count is
# exact, and the simulator always writes more than 16 tokens, so every answered
# call costs exactly its worst case and the cap admits exactly N of them.
MODEL = "gpt-3.5-turbo"
MESSAGES = [{"role": "user", "content": "Where is my parcel? It was due on Monday."}]
MAX_TOKENS = 16


async def _fire(gateway, secret, n):
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=gateway, limits=limits, timeout=60) as client:
        async def one(i):
            return await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS},
                headers={"Authorization": f"Bearer {secret}", "X-Request-ID": f"req-conc-{i}"},
            )

        return await asyncio.gather(*(one(i) for i in range(n)))


def _batched_opens() -> float:
    from conversations.gateway.metrics import DB_WRITES

    return DB_WRITES.labels("open", "batched")._value.get()


def test_two_hundred_concurrent_requests_never_pass_the_cap(gateway, app_key):
    app, _, secret = app_key
    priced = priced_model(name=MODEL)
    tokens = count_messages(MESSAGES, encoding=priced.model.encoding)
    assert not tokens.is_estimate
    per_call, _ = worst_case(price=priced.price, input_tokens=tokens.tokens, is_estimate=False, max_tokens=MAX_TOKENS)
    budget = make_budget(application=app, limit_usd=(per_call * 50 + per_call / 2).quantize(Decimal("0.000001")), name="tight")
    batched_before = _batched_opens()

    responses = asyncio.run(_fire(gateway, secret, 200))

    answered = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(answered) + len(refused) == 200, {r.status_code for r in responses}
    for r in refused:
        assert r.json()["error"]["code"] == "budget_exceeded"
        assert r.headers["X-Governance-Outcome"] == "refused"
    assert len(answered) == 50, "the cap admits exactly as many calls as it can pay for"

    period = BudgetPeriod.objects.get(budget=budget)
    assert period.spent_usd <= budget.limit_usd
    assert period.reserved_usd == 0 and period.reserved_tokens == 0
    assert not Reservation.objects.filter(status="held").exists()

    calls = ProviderCall.objects.filter(request_id__startswith="req-conc-")
    assert calls.count() == 200
    succeeded = list(calls.filter(status="succeeded"))
    assert len(succeeded) == 50
    for call in succeeded:
        assert call.cost_usd == cost_of(price=call.price, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens, cached_tokens=call.cached_tokens)
        assert call.decisions[0]["kind"] == "budget_reserved"
    assert period.spent_usd == sum(c.cost_usd for c in succeeded)
    assert calls.filter(status="refused", error_code="budget_exceeded").count() == 150
    if connection.vendor == "postgresql":
        # the cap held although requests shared transactions (group commit)
        assert _batched_opens() > batched_before
