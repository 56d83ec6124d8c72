"""What managers configure changes what the gateway does, visibly: degraded or
refused outcomes, and every decision written on the call."""

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal

import httpx
import openai
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from budgets.models import BudgetPeriod, DegradationRule, Reservation, StepPolicy
from budgets.services import expire_stale_reservations
from conversations.models import ProviderCall
from tests.budget_helpers import make_budget
from tests.conftest import free_port

MESSAGES = [{"role": "system", "content": "Be brief."}] + [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "words " * 5} for i in range(9)
]


def chat(gateway, secret, *, rid, messages=MESSAGES, headers=None, **body):
    return httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": messages, **body},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": rid, **(headers or {})},
        timeout=30,
    )


def kinds(call):
    return [d["kind"] for d in call.decisions]


def spend(budget, usd):
    """Make a budget look `usd` spent this period. Written behind the
    gateway's back, so its recent readings of the budget are dropped too, as
    if their maximum age had passed (tests/test_ladder_readings.py)."""
    from budgets import readings
    from budgets.services import period_rows

    [row] = period_rows(budgets=[budget], end_user="", at=timezone.now())
    BudgetPeriod.objects.filter(pk=row.pk).update(spent_usd=Decimal(usd))
    readings.forget()


def test_ladder_degrades_then_refuses(gateway, app_key):
    app, _, secret = app_key
    budget = make_budget(application=app, limit_usd=Decimal("10"))
    DegradationRule.objects.create(application=app, threshold_percent=80, switch_to_model="gpt-4o-mini")
    DegradationRule.objects.create(application=app, threshold_percent=90, max_tokens_cap=32, keep_last_turns=4)
    DegradationRule.objects.create(application=app, threshold_percent=100, refuse=True)

    r = chat(gateway, secret, rid="l0")
    assert r.status_code == 200 and r.headers["X-Governance-Outcome"] == "answered"
    assert ProviderCall.objects.get(request_id="l0").model_used == "gpt-4o"

    spend(budget, "8.5")
    r = chat(gateway, secret, rid="l1")
    call = ProviderCall.objects.get(request_id="l1")
    assert r.headers["X-Governance-Outcome"] == "degraded" and call.outcome == "degraded"
    assert call.model_requested == "gpt-4o" and call.model_used == "gpt-4o-mini"
    assert kinds(call) == ["model_switched", "max_tokens_defaulted", "budget_reserved"], "degradation first, then the hold"
    assert call.price.model.name == "gpt-4o-mini"

    spend(budget, "9.5")
    r = chat(gateway, secret, rid="l2", max_tokens=500)
    call = ProviderCall.objects.get(request_id="l2")
    assert kinds(call) == ["model_switched", "max_tokens_capped", "turns_trimmed", "budget_reserved"]
    assert call.completion_tokens <= 32
    sent = list(call.messages.filter(direction="request").order_by("position"))
    assert [m.role for m in sent] == ["system", "assistant", "user", "assistant", "user"], "system kept, last 4 turns kept"
    trimmed = call.decisions[2]
    assert trimmed["dropped"] == 5 and trimmed["tokens_cut"] > 0

    spend(budget, "10")
    r = chat(gateway, secret, rid="l3")
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    assert r.headers["X-Governance-Outcome"] == "refused"
    call = ProviderCall.objects.get(request_id="l3")
    assert call.status == "refused" and kinds(call)[-1] == "refused"


def test_polite_refusal_reaches_an_unmodified_client(gateway, app_key):
    app, _, secret = app_key
    app.polite_refusal_message = "We're busy right now — a human will get back to you."
    app.save()
    budget = make_budget(application=app, limit_usd=Decimal("1"))
    DegradationRule.objects.create(application=app, threshold_percent=100, refuse=True, refusal_mode="polite")
    spend(budget, "1")
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES[:2])
    assert raw.headers["x-governance-outcome"] == "refused"
    assert raw.parse().choices[0].message.content == app.polite_refusal_message
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES[:2], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == app.polite_refusal_message
    calls = ProviderCall.objects.filter(status="refused", error_code="budget_exceeded", http_status=200)
    assert calls.count() == 2
    assert "budget policy" in calls.first().error_message


def test_hard_cap_refusal_uses_the_ladders_polite_mode(gateway, app_key):
    app, _, secret = app_key
    make_budget(application=app, limit_usd=Decimal("0.000001"))
    DegradationRule.objects.create(application=app, threshold_percent=100, refuse=True, refusal_mode="polite")
    r = chat(gateway, secret, rid="hc")
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == app.polite_refusal_message
    decision = ProviderCall.objects.get(request_id="hc").decisions[-1]
    assert decision["by"] == "hard_cap" and decision["mode"] == "polite"


def test_step_caps_truncate_with_a_visible_marker(gateway, app_key):
    app, _, secret = app_key
    StepPolicy.objects.create(application=app, step="summarise", max_input_tokens=200, max_output_tokens=20, oversize="truncate_middle")
    pasted = "This is a line of a thirty page document that the user pasted. " * 300
    r = chat(gateway, secret, rid="tr", messages=[{"role": "user", "content": pasted}], headers={"X-Step": "summarise"}, max_tokens=100)
    assert r.status_code == 200 and r.headers["X-Governance-Outcome"] == "degraded"
    call = ProviderCall.objects.get(request_id="tr")
    assert call.step == "summarise"
    cut = next(d for d in call.decisions if d["kind"] == "input_truncated")
    assert cut["tokens_before"] > 2000 and cut["tokens_after"] <= 200 and cut["tokens_cut"] == cut["tokens_before"] - cut["tokens_after"]
    sent = call.messages.get(direction="request").content
    assert "tokens removed by the gateway" in sent and sent.startswith("This is a line")
    assert call.prompt_tokens <= 200, "the provider saw the truncated input"
    assert next(d for d in call.decisions if d["kind"] == "max_tokens_capped")["to"] == 20
    assert call.completion_tokens <= 20


def test_step_cap_truncate_oldest_drops_turns_first(gateway, app_key):
    app, _, secret = app_key
    StepPolicy.objects.create(application=app, step="", max_input_tokens=60, oversize="truncate_oldest")
    chat(gateway, secret, rid="old")
    call = ProviderCall.objects.get(request_id="old")
    sent = list(call.messages.filter(direction="request").order_by("position"))
    assert sent[0].role == "system" and sent[-1].content == MESSAGES[-1]["content"]
    assert len(sent) < len(MESSAGES)


def test_step_cap_can_refuse(gateway, app_key):
    app, _, secret = app_key
    StepPolicy.objects.create(application=app, step="answer", max_input_tokens=20, oversize="refuse")
    r = chat(gateway, secret, rid="big", headers={"X-Step": "answer"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_large"
    assert "answer" in r.json()["error"]["message"]
    call = ProviderCall.objects.get(request_id="big")
    assert call.status == "refused" and call.decisions[-1]["by"] == "input_limit"
    assert not call.messages.exists()


def test_scoped_budgets_apply_by_header(gateway, app_key):
    app, key, secret = app_key
    make_budget(application=app, scope="step", step="rewrite_query", limit_usd=Decimal("0.000001"), name="rewrite step")
    make_budget(application=app, scope="end_user", end_user="greedy", limit_usd=Decimal("0.000001"), name="greedy user")
    assert chat(gateway, secret, rid="s1", headers={"X-Step": "rewrite_query"}).status_code == 429
    assert chat(gateway, secret, rid="s2", headers={"X-Step": "answer"}).status_code == 200
    assert chat(gateway, secret, rid="s3", headers={"X-End-User": "greedy"}).status_code == 429
    assert chat(gateway, secret, rid="s4", user="greedy").status_code == 429
    assert chat(gateway, secret, rid="s5", headers={"X-End-User": "modest"}).status_code == 200
    assert "rewrite step" in ProviderCall.objects.get(request_id="s1").error_message
    assert "greedy user" in ProviderCall.objects.get(request_id="s3").error_message


def test_failed_call_releases_its_hold(gateway, sim, app_key):
    app, _, secret = app_key
    budget = make_budget(application=app, limit_usd=Decimal("5"))
    httpx.post(f"{sim.control_url}/faults", json={"faults": ["500"] * (app.max_retries + 1)}).raise_for_status()
    assert chat(gateway, secret, rid="f1").status_code == 502
    period = BudgetPeriod.objects.get(budget=budget)
    assert period.reserved_usd == 0 and period.spent_usd == 0
    assert Reservation.objects.get().status == "released"


# --- a gateway process killed mid-call ---------------------------------------------

def _database_url() -> str:
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def test_killed_worker_hold_expires_and_call_is_interrupted(transactional_db, app_key):
    from simulator.testing import start_simulator_process

    app, _, secret = app_key
    budget = make_budget(application=app, limit_usd=Decimal("5"))
    port = free_port()
    with start_simulator_process(port=0, latency_ms=20_000) as slow:
        env = {
            **os.environ, "DATABASE_URL": _database_url(), "OPENAI_BASE_URL": slow.base_url,
            "GATEWAY_RESERVATION_TTL_S": "1", "LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off", "--log-level", "warning"],
            cwd=django_settings.BASE_DIR, env=env,
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            errors = []
            t = threading.Thread(
                target=lambda: errors.append(
                    pytest.raises(httpx.HTTPError, chat, f"http://127.0.0.1:{port}", secret, rid="killed")
                ),
                daemon=True,
            )
            t.start()
            deadline = time.monotonic() + 15
            while not Reservation.objects.filter(call__request_id="killed", status="held").exists():
                assert time.monotonic() < deadline, "the call never reached the provider"
                time.sleep(0.05)
            assert BudgetPeriod.objects.get(budget=budget).reserved_usd > 0
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            t.join(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert expire_stale_reservations() == 0, "a hold is never reaped before it expires"
    # holds outlive the application's deadline by 30 s, so a slow call is never reaped while alive
    later = timezone.now() + dt.timedelta(seconds=float(app.request_deadline_s) + 31)
    assert expire_stale_reservations(now=later) == 1
    call = ProviderCall.objects.get(request_id="killed")
    assert call.status == "interrupted" and call.outcome == "failed"
    period = BudgetPeriod.objects.get(budget=budget)
    assert period.reserved_usd == 0 and period.spent_usd == 0
    assert Reservation.objects.get(call=call).status == "expired"


needs_group_commit = pytest.mark.skipif(connection.vendor != "postgresql", reason="group commit runs on Postgres")


@pytest.fixture
def opens_always_shared(monkeypatch):
    """As under load: another open is always being written, so each call is
    opened by group commit while its request waits on the event loop."""
    from conversations import recording_sql

    monkeypatch.setattr(recording_sql.OPENS, "write_if_idle", lambda *args, **kwargs: None)


@needs_group_commit
def test_a_call_opened_by_group_commit_is_answered_and_settled(gateway, app_key, opens_always_shared):
    app, _, secret = app_key
    budget = make_budget(application=app, limit_usd=Decimal("10"))
    r = chat(gateway, secret, rid="shared-open")
    assert r.status_code == 200
    call = ProviderCall.objects.get(request_id="shared-open")
    assert call.status == "succeeded" and call.cost_usd > 0
    assert "budget_reserved" in kinds(call)
    period = BudgetPeriod.objects.get(budget=budget)
    assert period.spent_usd == call.cost_usd and period.reserved_usd == 0
    assert set(Reservation.objects.filter(call=call).values_list("status", flat=True)) == {"settled"}


@needs_group_commit
def test_a_hard_cap_refusal_through_group_commit_is_recorded_once(gateway, app_key, opens_always_shared):
    app, _, secret = app_key
    make_budget(application=app, limit_usd=Decimal("0.000001"))
    r = chat(gateway, secret, rid="shared-refused")
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
    [call] = ProviderCall.objects.filter(request_id="shared-refused")
    assert call.status == "refused" and call.decisions[-1]["by"] == "hard_cap"
    assert not Reservation.objects.filter(call__application=app).exists()
