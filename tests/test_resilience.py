"""Survives contact with reality: retries with backoff inside a deadline,
fallbacks, a shared circuit breaker, defined failure replies, rate limits,
the response cache, client disconnects, and Redis or Postgres going away."""

import os
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import pytest
from django.conf import settings as django_settings

from budgets.models import BudgetPeriod, LanguageModel
from budgets.selectors import cost_of
from conversations.gateway import breaker
from conversations.models import ProviderCall
from governance.models import FallbackRoute
from tests.budget_helpers import make_budget
from tests.conftest import database_url, free_port, raw_connection

MESSAGES = [{"role": "user", "content": "Is my order shipped?"}]


def chat(gateway, secret, rid, *, model="gpt-4o", stream=False, timeout=30, **extra):
    return httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "stream": stream, **extra},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": rid},
        timeout=timeout,
    )


def faults(sim, *names, **overrides):
    httpx.post(f"{sim.control_url}/faults", json={"faults": list(names), **overrides}, timeout=5).raise_for_status()


def sim_log(sim):
    return httpx.get(f"{sim.control_url}/log", timeout=5).json()["entries"]


def configure(app, **fields):
    for k, v in fields.items():
        setattr(app, k, v)
    app.save()


def test_retries_with_backoff_honouring_retry_after(gateway, sim, app_key):
    app, _, secret = app_key
    configure(app, max_retries=2, retry_backoff_ms=50)
    faults(sim, "500", "429")  # the simulator's 429 says Retry-After: 1
    t0 = time.monotonic()
    r = chat(gateway, secret, "retry-1")
    assert r.status_code == 200
    call = ProviderCall.objects.get(request_id="retry-1")
    assert [a["outcome"] for a in call.attempts] == ["http_500", "http_429", "ok"]
    assert 25 <= call.attempts[0]["wait_ms"] <= 50, "first backoff: jitter within the 50 ms ceiling"
    assert call.attempts[1]["wait_ms"] >= 1000, "Retry-After is honoured"
    assert time.monotonic() - t0 >= 1.0
    assert call.status == "succeeded" and len(sim_log(sim)) == 3


def test_retries_never_outlive_the_deadline(gateway, sim, app_key):
    app, _, secret = app_key
    configure(app, max_retries=5, retry_backoff_ms=400, request_deadline_s=Decimal("0.6"))
    faults(sim, "500", "500", "500", "500", "500", "500")
    t0 = time.monotonic()
    r = chat(gateway, secret, "deadline-1")
    elapsed = time.monotonic() - t0
    assert r.status_code == 502 and r.headers["X-Governance-Reason"] == "provider_down"
    assert elapsed < 0.6 + 0.3
    call = ProviderCall.objects.get(request_id="deadline-1")
    assert call.attempts[-1].get("gave_up") == "backoff would pass the deadline"
    assert len(call.attempts) < 6


def test_a_hanging_provider_ends_at_the_deadline(gateway, sim, app_key):
    app, _, secret = app_key
    configure(app, request_deadline_s=Decimal("1"), read_timeout_s=Decimal("30"))
    faults(sim, "hang")
    t0 = time.monotonic()
    r = chat(gateway, secret, "hang-1")
    assert 0.9 <= time.monotonic() - t0 < 2.0
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert r.headers["X-Governance-Outcome"] == "failed" and r.headers["X-Governance-Reason"] == "deadline_exceeded"
    call = ProviderCall.objects.get(request_id="hang-1")
    assert call.status == "failed" and call.error_code == "deadline_exceeded"


def test_fallback_model_answers_and_is_billed_at_its_price(gateway, sim, app_key):
    app, _, secret = app_key
    configure(app, max_retries=1, retry_backoff_ms=10)
    FallbackRoute.objects.create(application=app, position=1, model="gpt-4o-mini")
    budget = make_budget(application=app, limit_usd=Decimal("10"))
    faults(sim, "500", "reset")
    r = chat(gateway, secret, "fb-1")
    assert r.status_code == 200
    call = ProviderCall.objects.get(request_id="fb-1")
    assert call.model_requested == "gpt-4o" and call.model_used == "gpt-4o-mini"
    assert call.price.model.name == "gpt-4o-mini"
    assert call.cost_usd == cost_of(price=call.price, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens)
    assert [(a["model"], a["outcome"]) for a in call.attempts] == [("gpt-4o", "http_500"), ("gpt-4o", "error"), ("gpt-4o-mini", "ok")]
    assert any(d["kind"] == "fallback_used" for d in call.decisions)
    period = BudgetPeriod.objects.get(budget=budget)
    assert period.spent_usd == call.cost_usd and period.reserved_usd == 0


def test_retryable_statuses():
    from conversations.gateway.attempts import RETRYABLE_STATUS

    assert {429, 500, 502, 503, 504} <= RETRYABLE_STATUS and 400 not in RETRYABLE_STATUS and 401 not in RETRYABLE_STATUS


def test_circuit_breaker_opens_refuses_fast_then_probes(gateway, sim, app_key, settings):
    app, _, secret = app_key
    configure(app, max_retries=0)
    settings.GATEWAY = {**settings.GATEWAY, "BREAKER": {"MIN_CALLS": 3, "FAILURE_RATIO": 0.5, "OPEN_S": 1.0, "PROBE_TIMEOUT_S": 5.0}}
    faults(sim, "500", "500", "500")
    for i in range(3):
        assert chat(gateway, secret, f"cb-{i}").status_code == 502
    [state] = [s for s in breaker.states() if s.key.endswith("|gpt-4o")]
    assert state.state == "open" and state.failures == 3

    before = len(sim_log(sim))
    r = chat(gateway, secret, "cb-open")
    assert r.status_code == 503 and r.json()["error"]["code"] == "provider_unavailable"
    assert r.headers["X-Governance-Reason"] == "provider_down"
    assert len(sim_log(sim)) == before, "an open breaker sends nothing upstream"
    assert ProviderCall.objects.get(request_id="cb-open").attempts[0]["outcome"] == "breaker_open"

    time.sleep(1.1)  # half-open: the next call is the probe
    assert chat(gateway, secret, "cb-probe").status_code == 200
    assert [s.state for s in breaker.states() if s.key.endswith("|gpt-4o")] == ["closed"]
    assert chat(gateway, secret, "cb-after").status_code == 200


def test_polite_failure_replies(gateway, sim, app_key):
    app, _, secret = app_key
    configure(app, max_retries=0, failure_reply="polite", down_message="We're having trouble. A human will reply soon.")
    faults(sim, "500")
    r = chat(gateway, secret, "polite-down")
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "We're having trouble. A human will reply soon."
    assert r.headers["X-Governance-Outcome"] == "failed" and r.headers["X-Governance-Reason"] == "provider_down"
    configure(app, request_deadline_s=Decimal("0.5"))
    faults(sim, "hang")
    r = chat(gateway, secret, "polite-slow", stream=True)
    assert r.status_code == 200 and app.slow_message.split(",")[0] in r.text and r.text.endswith("data: [DONE]\n\n")
    assert r.headers["X-Governance-Reason"] == "deadline_exceeded"
    assert ProviderCall.objects.get(request_id="polite-slow").error_code == "deadline_exceeded"


def test_rate_limits_per_key_and_application(gateway, sim, app_key):
    app, key, secret = app_key
    key.requests_per_minute = 2
    key.save()
    statuses = [chat(gateway, secret, f"rl-{i}").status_code for i in range(3)]
    assert statuses == [200, 200, 429]
    r = chat(gateway, secret, "rl-x")
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and 1 <= int(r.headers["Retry-After"]) <= 61
    assert "API key" in r.json()["error"]["message"]
    call = ProviderCall.objects.get(request_id="rl-x")
    assert call.status == "refused" and call.decisions[-1]["by"] == "rate_limit"

    key.requests_per_minute = None
    key.save()
    configure(app, tokens_per_minute=100)
    r = chat(gateway, secret, "tpm", max_tokens=200)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]


def test_response_cache_hit_costs_nothing_and_stays_in_its_application(gateway, sim, app_key, other_app_key):
    app, _, secret = app_key
    other, _, other_secret = other_app_key
    configure(app, response_cache_ttl_s=60)
    configure(other, response_cache_ttl_s=60)
    budget = make_budget(application=app, limit_usd=Decimal("5"))
    first = chat(gateway, secret, "c1")
    second = chat(gateway, secret, "c2")
    assert first.json() == second.json()
    hit = ProviderCall.objects.get(request_id="c2")
    assert hit.cost_usd == 0 and any(d["kind"] == "cache_hit" for d in hit.decisions)
    assert hit.prompt_tokens == first.json()["usage"]["prompt_tokens"]
    assert len(sim_log(sim)) == 1, "the hit never reached the provider"
    assert BudgetPeriod.objects.get(budget=budget).spent_usd == ProviderCall.objects.get(request_id="c1").cost_usd
    chat(gateway, other_secret, "c3")
    assert len(sim_log(sim)) == 2, "another application never gets this application's cached answer"
    chat(gateway, secret, "c4", temperature=0.9)
    assert len(sim_log(sim)) == 3, "different parameters, different entry"


def test_client_disconnect_mid_stream_is_recorded_as_cancelled(transactional_db, app_key, _gateway_server):
    from simulator.testing import start_simulator_process

    app, _, secret = app_key
    with start_simulator_process(port=0, chunk_delay_ms=100) as slow:
        old = django_settings.OPENAI_BASE_URL
        django_settings.OPENAI_BASE_URL = slow.base_url
        try:
            with httpx.stream(
                "POST", f"{_gateway_server.url}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
                headers={"Authorization": f"Bearer {secret}", "X-Request-ID": "gone"}, timeout=30,
            ) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data:") for line in got)
            deadline = time.monotonic() + 10
            while ProviderCall.objects.get(request_id="gone").status == "in_progress":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            entries = httpx.get(f"{slow.control_url}/log").json()["entries"]
        finally:
            django_settings.OPENAI_BASE_URL = old
    call = ProviderCall.objects.get(request_id="gone")
    assert call.status == "cancelled" and call.error_code == "client_disconnected"
    assert call.completion_tokens > 0 and call.usage_source == "estimated"
    assert call.messages.get(direction="response").content
    assert entries[-1]["completed"] is False, "the provider stream was closed, not read to the end"


@pytest.mark.skipif(django_settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"), reason="holds a Postgres row lock")
def test_client_gone_while_the_call_is_opened_leaves_no_hold_behind(gateway, sim, app_key):
    """The client gives up while the call's open waits for the budget row:
    the open completes all the same, so the call is closed as cancelled at
    once and its hold released, not left in progress until the reaper."""
    from budgets.models import Reservation

    app, _, secret = app_key
    budget = make_budget(application=app, limit_usd=Decimal("10"))
    assert chat(gateway, secret, "first").status_code == 200  # the period row exists now
    period = BudgetPeriod.objects.get(budget=budget)
    spent = period.spent_usd
    asked = len(sim_log(sim))

    raw = raw_connection()
    try:
        raw.execute("SELECT 1 FROM budgets_budgetperiod WHERE id = %s FOR UPDATE", (period.pk,))
        with pytest.raises(httpx.ReadTimeout):
            chat(gateway, secret, "gone-early", timeout=1.0)
        time.sleep(0.3)  # the server notices the closed connection before the open can go on
    finally:
        raw.rollback()
        raw.close()

    deadline = time.monotonic() + 10
    while not ProviderCall.objects.filter(request_id="gone-early").exclude(status="in_progress").exists():
        assert time.monotonic() < deadline, "the abandoned call stayed in progress"
        time.sleep(0.05)
    call = ProviderCall.objects.get(request_id="gone-early")
    assert (call.status, call.http_status, call.error_code) == ("cancelled", 499, "client_disconnected")
    assert call.cost_usd is None and len(sim_log(sim)) == asked, "the provider was never asked"
    assert list(Reservation.objects.filter(call=call).values_list("status", flat=True)) == ["released"]
    period.refresh_from_db()
    assert period.reserved_usd == 0 and period.spent_usd == spent


# --- infrastructure going away -----------------------------------------------------

def _gateway_process(env_overrides):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url(), "LOG_LEVEL": "WARNING", **env_overrides}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off", "--log-level", "warning"],
        cwd=django_settings.BASE_DIR, env=env, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/healthz", timeout=0.5)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gateway did not start")


def test_redis_down_keeps_serving_and_says_so(transactional_db, sim, app_key):
    app, key, secret = app_key
    key.requests_per_minute = 1000
    key.save()
    proc, url = _gateway_process({"REDIS_URL": "redis://127.0.0.1:1/0", "OPENAI_BASE_URL": sim.base_url})
    try:
        for i in range(3):
            r = chat(url, secret, f"noredis-{i}")
            assert r.status_code == 200, r.text
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["status"] == "ready"
        assert ready["checks"]["shared_cache"].startswith("degraded")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "shared_cache.down" in err, "the degradation is said in the logs"


def test_database_down_is_a_clear_503(transactional_db, sim, app_key):
    from django.db import connection

    bad = "sqlite:////nonexistent-dir/db.sqlite3" if connection.vendor == "sqlite" else "postgres://postgres@127.0.0.1:1/nowhere"
    proc, url = _gateway_process({"OPENAI_BASE_URL": sim.base_url, "DATABASE_URL": bad})
    try:
        r = chat(url, app_key[2], "nodb", timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
        assert "nothing was sent" in r.json()["error"]["message"]
        assert r.headers["Retry-After"]
        assert len(sim_log(sim)) == 0
        assert httpx.get(f"{url}/readyz").status_code == 503
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_database_blip_after_the_answer_does_not_lose_the_record(gateway, sim, app_key, monkeypatch):
    """The final write fails twice (as during a Postgres restart), then works:
    the answer is delivered and recorded once."""
    from django.db import OperationalError

    from conversations import recording_sql, services
    from conversations.gateway import pipeline

    # the write itself fails: the ORM's on SQLite, the function call on Postgres
    owner, name = (recording_sql.FINISHES, "_single") if services.sql_recording() else (services, "_finish_call_orm")
    real = getattr(owner, name)
    failures = []

    def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError("server closed the connection unexpectedly")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    monkeypatch.setattr(pipeline, "FINISH_RETRY_DELAYS_S", (0.05, 0.05, 0.05))
    _, _, secret = app_key
    r = chat(gateway, secret, "blip")
    assert r.status_code == 200 and len(failures) == 2
    call = ProviderCall.objects.get(request_id="blip")
    assert call.status == "succeeded" and call.messages.filter(direction="response").count() == 1
