"""A degradation ladder evaluated from what the gateway's own writes returned
(budgets/readings.py): the same decisions as with a query, without one, for
as long as GATEWAY["LADDER_READING_MAX_AGE_MS"] allows."""

import time
from datetime import datetime, timezone as dt_timezone
from decimal import Decimal

import httpx
import pytest
from django.db import connection

from budgets import readings
from budgets.models import BudgetPeriod, DegradationRule
from conversations.models import ProviderCall
from tests.budget_helpers import make_budget

needs_sql_recording = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="readings come from the Postgres functions' answers"
)


def ask(gateway, secret, rid, **body) -> ProviderCall:
    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Where is my parcel?"}], **body},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return ProviderCall.objects.get(request_id=rid)


def switched(call: ProviderCall) -> dict | None:
    return next((d for d in call.decisions if d["kind"] == "model_switched"), None)


def max_age(settings, ms: float) -> None:
    settings.GATEWAY = {**settings.GATEWAY, "LADDER_READING_MAX_AGE_MS": ms}


@needs_sql_recording
def test_a_recent_reading_stands_in_for_the_query_until_it_is_too_old(gateway, app_key, settings):
    app, _, secret = app_key
    max_age(settings, 60_000)
    budget = make_budget(application=app, limit_usd=Decimal("10"))
    DegradationRule.objects.create(application=app, threshold_percent=80, switch_to_model="gpt-4o-mini")
    assert ask(gateway, secret, "r0").model_used == "gpt-4o"

    # 90 % spent behind this process's back, as another gateway process would:
    # the reading r0's finish returned, seconds old, still stands.
    BudgetPeriod.objects.filter(budget=budget).update(spent_usd=Decimal("9"))
    r1 = ask(gateway, secret, "r1")
    assert r1.model_used == "gpt-4o" and switched(r1) is None

    # Once the reading is older than allowed, the ladder reads the budget again.
    max_age(settings, 50)
    time.sleep(0.1)
    r2 = ask(gateway, secret, "r2")
    assert r2.model_used == "gpt-4o-mini"
    assert switched(r2)["utilisation_percent"] >= 90

    # 0: a query before every call, so a change is seen at once.
    max_age(settings, 0)
    BudgetPeriod.objects.filter(budget=budget).update(spent_usd=Decimal("0"), reserved_usd=Decimal("0"))
    assert ask(gateway, secret, "r3").model_used == "gpt-4o"


@needs_sql_recording
def test_the_ladder_counts_what_this_process_spent_without_reading_it_again(gateway, app_key, settings):
    app, _, secret = app_key
    max_age(settings, 60_000)
    budget = make_budget(application=app, limit_tokens=100)
    DegradationRule.objects.create(application=app, threshold_percent=10, switch_to_model="gpt-4o-mini")
    assert ask(gateway, secret, "r0", max_tokens=16).model_used == "gpt-4o"

    period = BudgetPeriod.objects.get(budget=budget)
    used = (period.spent_tokens + period.reserved_tokens) / 100 * 100
    assert period.reserved_tokens == 0 and used >= 10, "r0 settled, and spent enough to cross the rung"
    r1 = ask(gateway, secret, "r1", max_tokens=16)
    assert r1.model_used == "gpt-4o-mini"
    assert switched(r1)["utilisation_percent"] == round(used, 2), "the figure r0's finish returned, to the token"


START = datetime(2026, 12, 1, tzinfo=dt_timezone.utc)


def row(period_id, budget_id, spent="1.50", reserved="0.25", tokens=10, held=5):
    return {"id": period_id, "budget_id": budget_id, "spent_usd": spent, "reserved_usd": reserved,
            "spent_tokens": tokens, "reserved_tokens": held}


def test_readings_need_every_period_and_a_positive_age():
    readings.forget()
    readings.observe([row(7, 1)], keys={1: (1, "", START)})
    [seen] = readings.fresh([(1, "", START)], 60)
    assert (seen.spent_usd, seen.reserved_usd, seen.spent_tokens, seen.reserved_tokens) == (Decimal("1.50"), Decimal("0.25"), 10, 5)
    assert readings.fresh([(1, "", START), (2, "", START)], 60) is None, "one budget never seen: query"
    assert readings.fresh([(1, "someone", START)], 60) is None, "another end user's period"
    assert readings.fresh([(1, "", START)], 0) is None, "0 turns readings off"

    # A later write of the same period (known by its id alone) replaces the figure.
    readings.observe([row(7, 1, spent="2.00", held=0)])
    [seen] = readings.fresh([(1, "", START)], 60)
    assert seen.spent_usd == Decimal("2.00") and seen.reserved_tokens == 0
    readings.forget()
    assert readings.fresh([(1, "", START)], 60) is None


def test_old_readings_are_dropped_when_the_store_grows(monkeypatch, settings):
    readings.forget()
    max_age(settings, 0)
    monkeypatch.setattr(readings, "_PRUNE_AT", 3)
    monkeypatch.setattr(readings.time, "monotonic", lambda: 100.0)
    readings.observe([row(i, i) for i in range(1, 4)], keys={i: (i, "", START) for i in range(1, 4)})
    monkeypatch.setattr(readings.time, "monotonic", lambda: 105.0)  # five seconds later
    readings.observe([row(9, 9)], keys={9: (9, "", START)})
    assert set(readings._by_period) == {9} and set(readings._period_of) == {(9, "", START)}
    readings.forget()
