"""Admission decided from memory runs on the event loop; whatever needs the
database, Redis or a long count goes to a database thread, from the start,
with the same outcome (conversations/gateway/offline.py)."""

import time
from decimal import Decimal

import httpx
import pytest
from django.db import connection
from prometheus_client import REGISTRY

from budgets.models import DegradationRule
from conversations.gateway import config_cache, offline
from conversations.models import ProviderCall
from tests.budget_helpers import make_budget

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="the event-loop admission is the Postgres path's")


def admissions(where: str, reason: str = "") -> float:
    return REGISTRY.get_sample_value("gateway_admissions_total", {"where": where, "reason": reason}) or 0.0


def ask(gateway, secret, rid, content="Where is my parcel?", headers=None, **body) -> httpx.Response:
    return httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **body},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": rid, **(headers or {})},
        timeout=30,
    )


@pytest.fixture
def warm(gateway, app_key):
    """One request fills the configuration cache; with Redis, the process
    also waits to be subscribed to configuration changes."""
    app, _, secret = app_key
    make_budget(application=app, limit_usd=Decimal("50"))
    DegradationRule.objects.create(application=app, threshold_percent=90, switch_to_model="gpt-4o-mini")
    assert ask(gateway, secret, "warm-up").status_code == 200
    deadline = time.monotonic() + 10
    while config_cache.shared.redis_url() and not config_cache._listener.live:
        assert time.monotonic() < deadline, "the configuration listener did not subscribe"
        time.sleep(0.05)
    return app, secret


def test_a_request_decided_from_memory_is_admitted_on_the_loop(gateway, warm):
    app, secret = warm
    before = admissions("loop")
    r = ask(gateway, secret, "on-loop")
    assert r.status_code == 200 and r.headers["X-Governance-Outcome"] == "answered"
    assert admissions("loop") == before + 1
    call = ProviderCall.objects.get(request_id="on-loop")
    warm_call = ProviderCall.objects.get(request_id="warm-up")
    assert call.status == "succeeded" and call.reservations.get().status == "settled"
    assert [d["kind"] for d in call.decisions] == [d["kind"] for d in warm_call.decisions], "same decisions either way"
    assert call.estimated_prompt_tokens == warm_call.estimated_prompt_tokens


def test_rate_limited_requests_are_admitted_and_refused_on_the_loop(gateway, warm):
    """The counters are in Redis; counting them needs no database thread, so
    an application with rate limits stays on the loop, and the limit holds."""
    app, secret = warm
    app.requests_per_minute = 2
    app.save()
    config_cache.changed()
    assert ask(gateway, secret, "rl-1").status_code == 200  # may refresh the configuration on a thread
    before = admissions("loop")
    assert ask(gateway, secret, "rl-2").status_code == 200
    r = ask(gateway, secret, "rl-3")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    assert admissions("loop") == before + 2, "both admitted on the loop, the refused one too"
    refused = ProviderCall.objects.get(request_id="rl-3")
    assert refused.status == "refused" and refused.decisions[-1] == {"kind": "refused", "by": "rate_limit"}
    assert ProviderCall.objects.get(request_id="rl-2").status == "succeeded"
    assert not refused.reservations.exists(), "nothing held for a refused request"


def test_a_refusal_is_recorded_from_a_thread(gateway, warm):
    _, secret = warm
    before = admissions("thread", "recording a refusal")
    r = ask(gateway, secret, "bad-step", headers={"X-Step": "no spaces allowed"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Step"
    assert admissions("thread", "recording a refusal") == before + 1
    assert ProviderCall.objects.get(request_id="bad-step").status == "refused"


def test_a_long_input_is_counted_on_a_thread(gateway, warm):
    _, secret = warm
    before = admissions("thread", "counting a long input")
    r = ask(gateway, secret, "long", content="word " * (offline.MAX_TEXT_ON_LOOP // 4))
    assert r.status_code == 200
    assert admissions("thread", "counting a long input") == before + 1
    assert ProviderCall.objects.get(request_id="long").estimated_prompt_tokens > offline.MAX_TEXT_ON_LOOP // 5


def test_a_budget_reading_too_old_is_read_again_on_a_thread(gateway, warm, settings):
    _, secret = warm
    settings.GATEWAY = {**settings.GATEWAY, "LADDER_READING_MAX_AGE_MS": 0}
    before = admissions("thread", "reading the budgets")
    assert ask(gateway, secret, "stale").status_code == 200
    assert admissions("thread", "reading the budgets") == before + 1


def test_io_is_refused_only_inside_the_forbidden_block():
    offline.needs_io("anything")  # allowed outside
    with pytest.raises(offline.NeedsIO, match="configuration"):
        with offline.io_forbidden():
            offline.needs_io("configuration")
    offline.needs_io("anything")  # and allowed again after
