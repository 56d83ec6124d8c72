"""On Postgres the gateway writes through two SQL functions; the ORM path is the
reference. The same calls through both must leave the same rows."""

from decimal import Decimal

import pytest
from django.db import connection
from django.forms.models import model_to_dict

from budgets.models import BudgetPeriod, CostEvent, Reservation
from budgets.services import BudgetExceeded
from conversations import services
from conversations.models import Conversation, Message, ProviderCall
from governance.services import create_api_key
from tests.budget_helpers import D, make_budget
from tests.conftest import raw_connection
from tests.factories import make_application, make_model

pytestmark = pytest.mark.skipif(connection.vendor != "postgresql", reason="the SQL functions exist on Postgres only")

MESSAGES = [
    {"role": "system", "content": "You are a support bot."},
    {"role": "user", "content": [{"type": "text", "text": "Where is my order?"}], "name": "alice"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "content": "shipped", "tool_call_id": "t1"},
]


def _world(slug: str, warn_at=(40, 80)):
    app = make_application(slug=slug)
    key = create_api_key(application=app).api_key
    app_budget = make_budget(application=app, limit_usd=D("0.001000"), name=f"{slug} app", warn_at=list(warn_at))
    key_budget = make_budget(application=app, scope="api_key", api_key=key, limit_tokens=5000, name=f"{slug} key")
    per_user = make_budget(application=app, scope="end_user", limit_usd=D("1"), name=f"{slug} each user")
    return app, key, [app_budget, key_budget, per_user]


def _open(key, budgets, price, *, conversation="conv-1", hold=D("0.000400"), tokens=1200, request_id="req"):
    return services.open_call_with_holds(
        budgets=budgets, hold_usd=hold, hold_tokens=tokens, ttl_s=120,
        request_id=request_id, api_key=key, conversation_external_id=conversation, end_user="alice", step="answer",
        stream=False, model_requested="gpt-4o-mini", model_used="gpt-4o-mini", parameters={"max_tokens": 64, "temperature": 0.2},
        messages=MESSAGES, price=price, estimated_prompt_tokens=40, token_count_is_estimate=False,
        provider_base_url="http://127.0.0.1:1/v1", decisions=[{"kind": "max_tokens_capped", "from": None, "to": 64}],
    )


def _result(**kw):
    base = dict(
        status="succeeded", outcome="answered", http_status=200, latency_ms=12, provider_latency_ms=9,
        prompt_tokens=1000, completion_tokens=150, cached_tokens=200, reasoning_tokens=0, usage_source="provider",
        content="It shipped yesterday.", finish_reason="stop", provider_response_id="chatcmpl-1", provider_model="gpt-4o-mini",
        attempts=[{"n": 1, "outcome": "ok", "latency_ms": 9}], decisions=[{"kind": "note"}],
    )
    base.update(kw)
    return services.CallResult(**base)


def _snapshot(app) -> dict:
    skip = {"id", "application", "api_key", "conversation", "call", "budget", "budget_period", "price", "key_prefix"}
    calls = ProviderCall.objects.filter(application=app).order_by("request_id")

    def clean(obj, times=("created_at", "completed_at", "started_at", "last_activity_at", "closed_at", "expires_at")):
        return {k: v for k, v in model_to_dict(obj).items() if k not in skip and k not in times}

    return {
        "calls": [clean(c) for c in calls],
        "messages": [clean(m) for m in Message.objects.filter(call__application=app).order_by("call__request_id", "direction", "position")],
        "conversations": [clean(c) for c in Conversation.objects.filter(application=app).order_by("external_id")],
        "reservations": [
            clean(r) for r in Reservation.objects.filter(call__application=app).order_by("call__request_id", "budget_period__budget__scope")
        ],
        "periods": [
            (p.budget.scope, p.subject, clean(p))
            for p in BudgetPeriod.objects.filter(budget__application=app).order_by("budget__scope", "subject")
        ],
        "warnings": sorted(e.message.split("'", 2)[2] for e in CostEvent.objects.filter(application=app)),
    }


def _scenario(slug: str, price) -> dict:
    app, key, budgets = _world(slug)
    # answered and settled (the second settled call crosses the 40% warning)
    opened, holds = _open(key, budgets, price, request_id="a")
    assert [h.budget_name for h in holds] == [f"{slug} app", f"{slug} key", f"{slug} each user"]
    assert services.finish_call(call=opened, result=_result()).recorded
    # failed before any usage: holds released, no answer stored
    opened, _ = _open(key, budgets, price, request_id="b")
    services.finish_call(
        call=opened,
        result=_result(status="failed", outcome="failed", http_status=502, prompt_tokens=None, completion_tokens=None,
                       cached_tokens=None, usage_source="none", content="", error_type="api_error", error_code="upstream_error",
                       error_message="x" * 2500),
    )
    # a new conversation with tool calls in the answer
    opened, _ = _open(key, budgets, price, request_id="c", conversation="conv-2")
    services.finish_call(call=opened, result=_result(content="", tool_calls=[{"id": "t2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]))
    # refused: the hold would pass the USD cap; nothing is written for it
    with pytest.raises(BudgetExceeded) as info:
        _open(key, budgets, price, request_id="d", hold=D("0.000900"))
    snap = _snapshot(app)
    snap["refusal"] = info.value.message.replace(slug, "APP")
    # finishing twice records once and charges once
    again = services.finish_call(call=opened, result=_result())
    snap["second_finish_recorded"] = again.recorded
    snap["after_second_finish"] = _snapshot(app)["periods"]
    return snap


@pytest.mark.django_db(transaction=True)
def test_sql_functions_write_what_the_orm_writes(settings):
    _, price = make_model()
    settings.GATEWAY = {**settings.GATEWAY, "SQL_RECORDING": False}
    assert not services.sql_recording()
    reference = _scenario("orm", price)
    settings.GATEWAY = {**settings.GATEWAY, "SQL_RECORDING": True}
    assert services.sql_recording()
    fast = _scenario("sql", price)

    for key in ("calls", "messages", "conversations", "reservations", "periods", "warnings"):
        assert fast[key] == reference[key], key
    assert fast["refusal"] == reference["refusal"]
    assert fast["second_finish_recorded"] is reference["second_finish_recorded"] is False
    assert fast["after_second_finish"] == reference["after_second_finish"]
    # and the figures are the ones a reader of the books expects
    app_period = next(p for scope, _, p in fast["periods"] if scope == "application")
    cost = D("0.000150") * 800 / 1000 + D("0.000075") * 200 / 1000 + D("0.000600") * 150 / 1000
    assert Decimal(app_period["spent_usd"]) == cost * 2
    assert app_period["reserved_usd"] == 0
    assert fast["warnings"], "crossing 40% of the USD budget raised a warning"
    assert [c["error_message"] for c in fast["calls"]][1] == "x" * 2000


@pytest.mark.django_db(transaction=True)
def test_finish_settles_a_hold_the_reaper_expired(settings):
    """The provider answered after the hold expired: the cost is still charged once."""
    from budgets.services import expire_stale_reservations
    from django.utils import timezone

    _, price = make_model()
    app, key, budgets = _world("late")
    opened, _ = _open(key, budgets[:1], price, request_id="late")
    expire_stale_reservations(now=timezone.now() + timezone.timedelta(seconds=600))
    assert ProviderCall.objects.get(pk=opened.call_id).status == "interrupted"
    finished = services.finish_call(call=opened, result=_result())
    assert finished.recorded is False  # the record stays as the reaper closed it
    period = BudgetPeriod.objects.get(budget=budgets[0])
    assert period.reserved_usd == 0 and period.spent_usd > 0
    assert set(Reservation.objects.filter(call_id=opened.call_id).values_list("status", flat=True)) == {"settled"}


@pytest.mark.django_db(transaction=True)
def test_without_prepared_statements_the_functions_write_the_same(settings):
    """GATEWAY_PREPARED_STATEMENTS=false (behind PgBouncer's transaction
    pooling) sends the same statements unprepared, with the same result."""
    _, price = make_model()
    settings.GATEWAY = {**settings.GATEWAY, "SQL_RECORDING": False}
    reference = _scenario("orm", price)
    settings.GATEWAY = {**settings.GATEWAY, "SQL_RECORDING": True, "PREPARED_STATEMENTS": False}
    unprepared = _scenario("unprepared", price)
    for key in ("calls", "messages", "conversations", "reservations", "periods", "warnings", "refusal"):
        assert unprepared[key] == reference[key], key


def _wait_for_lock_waiter(raw, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with raw.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
            if cur.fetchone()[0]:
                return
        time.sleep(0.01)
    raise AssertionError("the open never waited for the budget lock")


@pytest.mark.django_db(transaction=True)
def test_budget_filled_between_the_two_checks_refuses_and_writes_nothing():
    """The cap is checked without the lock, the call inserted, then checked
    again under the lock. A concurrent request that took the headroom in
    between makes the function roll back (GW001); the call is opened again
    with the rows locked first and refused, leaving no trace of the first try."""
    import threading

    from conversations.gateway import metrics

    _, price = make_model()
    app, key, budgets = _world("race")
    opened, _ = _open(key, budgets[:1], price, request_id="first", hold=D("0.000100"))
    period = BudgetPeriod.objects.get(budget=budgets[0])
    races = metrics.BUDGET_RACES._value.get()

    raw = raw_connection()  # another request, holding the period row while it reserves almost everything left
    raw.execute("UPDATE budgets_budgetperiod SET reserved_usd = reserved_usd + 0.000850 WHERE id = %s", (period.pk,))
    outcome = {}

    def second():
        try:
            outcome["opened"] = _open(key, budgets[:1], price, request_id="second", hold=D("0.000100"))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=second)
    thread.start()
    watcher = raw_connection()
    try:
        _wait_for_lock_waiter(watcher)  # it passed the unlocked check and inserted, and now waits for the row
        raw.commit()
    finally:  # a failure must not leave the row locked: the teardown's flush would wait for it forever
        raw.close()
        watcher.close()
        thread.join(timeout=20)

    assert isinstance(outcome.get("error"), BudgetExceeded), outcome
    assert metrics.BUDGET_RACES._value.get() == races + 1
    assert list(ProviderCall.objects.filter(application=app).values_list("request_id", flat=True)) == ["first"]
    assert not Message.objects.filter(call__request_id="second").exists()
    period.refresh_from_db()
    assert period.reserved_usd == D("0.000950")  # the first call's hold and the other request's, nothing of the refused one
    assert Reservation.objects.filter(budget_period=period).count() == 1
    assert services.finish_call(call=opened, result=_result()).recorded


@pytest.mark.django_db(transaction=True)
def test_batch_where_a_later_item_no_longer_fits_is_written_again_one_by_one():
    """In a batch the caps are rechecked under the lock after the earlier
    items' holds: the batch rolls back and its requests are written one by
    one, so the first is opened and the second refused."""
    from conversations import recording_sql
    from conversations.group_commit import _Item

    _, price = make_model()
    app, key, budgets = _world("batch-race")
    payloads = []
    for request_id in ("one", "two"):
        request = _request(key, budgets[:1], price, request_id=request_id, conversation="c", user="alice", hold=D("0.000600"), tokens=10)
        payloads.append(_Item(request.payload, request.order))

    recording_sql.OPENS._write(payloads, leader=None)

    first, second = payloads
    assert first.error is None and first.result["call_id"]
    assert second.error is None and second.result["exceeded"]["unit"] == "usd"
    assert list(ProviderCall.objects.filter(application=app).values_list("request_id", flat=True)) == ["one"]
    assert BudgetPeriod.objects.get(budget=budgets[0]).reserved_usd == D("0.000600")


def _request(key, budgets, price, *, request_id, conversation, user, hold=D("0.000200"), tokens=900):
    """A request to open through the SQL functions, as the gateway builds it."""
    from conversations import recording_sql

    return recording_sql.OpenRequest.of(
        budgets=budgets, hold_usd=hold, hold_tokens=tokens, ttl_s=120, request_id=request_id, api_key=key,
        conversation_external_id=conversation, end_user=user, step="", stream=False, model_requested="gpt-4o-mini",
        model_used="gpt-4o-mini", parameters={}, messages=MESSAGES, price=price, estimated_prompt_tokens=40,
        token_count_is_estimate=False, provider_base_url="http://127.0.0.1:1/v1",
    )


def _write_all(phase: str, payloads: list[dict], *, batched: bool) -> list[dict]:
    """Opens or finishes, as one batch or in one transaction each."""
    from conversations import recording_sql

    one, many = {"open": (recording_sql.OPEN_ONE, recording_sql.OPEN_MANY),
                 "finish": (recording_sql.FINISH_ONE, recording_sql.FINISH_MANY)}[phase]
    if batched:
        return recording_sql._fetch(many, payloads)
    return [recording_sql._fetch(one, p) for p in payloads]


def _periods(rows, names: dict) -> list[dict]:
    """Period rows as an answer reports them, without ids (two worlds compare)."""
    return [{**{k: v for k, v in row.items() if k not in ("id", "budget_id")}, "budget": names[row["budget_id"]]}
            for row in rows or ()]


def _batch_or_single(slug: str, price, *, batched: bool) -> dict:
    """The same requests opened and finished in one transaction each, or as
    one batch per phase: holds on shared period rows, a refusal in the middle,
    a hold the reaper expired, a settlement and a release."""
    from budgets.services import expire_stale_reservations
    from django.utils import timezone

    from conversations import recording_sql

    app, key, budgets = _world(slug)
    names = {b.pk: b.name.replace(slug, "APP") for b in budgets}

    def request(n, *, hold=D("0.000200"), user="alice"):
        return _request(key, budgets, price, request_id=f"r{n}", conversation=f"conv-{n % 2}", user=user, hold=hold)

    def periods(rows):
        return _periods(rows, names)

    # r0 is opened first and its hold expires before the others open
    late = request(0)
    late_call, _ = recording_sql.opened_call(recording_sql._fetch(recording_sql.OPEN_ONE, late.payload), late)
    expire_stale_reservations(now=timezone.now() + timezone.timedelta(seconds=600))

    requests = [request(1), request(2, user="bob"), request(3, hold=D("0.002")), request(4, user="bob")]
    opened = _write_all("open", [r.payload for r in requests], batched=batched)
    out = {"opened": [periods(o.get("periods")) if "call_id" in o else o["exceeded"]["unit"] for o in opened]}
    calls = {r.payload["request_id"]: recording_sql.opened_call(o, r)[0] for r, o in zip(requests, opened) if "call_id" in o}

    failed = _result(status="failed", outcome="failed", http_status=502, prompt_tokens=None, completion_tokens=None,
                     cached_tokens=None, usage_source="none", content="", error_type="api_error", error_code="upstream_error")
    finishing = [(late_call, _result()), (calls["r1"], _result()), (calls["r2"], failed),
                 (calls["r4"], _result(prompt_tokens=300, completion_tokens=20, cached_tokens=0))]
    payloads = [recording_sql.finish_payload(call=c, result=r)[0] for c, r in finishing]
    finished = _write_all("finish", payloads, batched=batched)
    out["finished"] = [{**f, "periods": periods(f["periods"])} for f in finished]
    out["rows"] = _snapshot(app)
    return out


@pytest.mark.django_db(transaction=True)
def test_a_batch_holds_and_settles_what_its_calls_one_by_one_would():
    """A batch reads and writes each period row once; every item still sees
    the rows as they stood after its own hold or settlement, and the books
    end the same as when each call had its own transaction."""
    _, price = make_model()
    single = _batch_or_single("single", price, batched=False)
    batch = _batch_or_single("batch", price, batched=True)

    assert batch["opened"] == single["opened"]
    assert batch["finished"] == single["finished"]
    for key in ("calls", "messages", "conversations", "reservations", "periods"):
        assert batch["rows"][key] == single["rows"][key], key
    # the figures a reader expects: r1, r2 and r4 held in turn, r3 refused over the USD cap
    app_holds = [next(p["reserved_usd"] for p in o if p["budget"] == "APP app") for o in batch["opened"] if o != "usd"]
    assert [Decimal(v) for v in app_holds] == [D("0.0002"), D("0.0004"), D("0.0006")]
    assert batch["opened"][2] == "usd"
    assert [f["recorded"] for f in batch["finished"]] == [False, True, True, True]
    app_period = next(p for scope, _, p in batch["rows"]["periods"] if scope == "application")
    assert app_period["reserved_usd"] == 0 and app_period["spent_usd"] > 0
    statuses = sorted(r["status"] for r in batch["rows"]["reservations"])
    assert statuses == ["released"] * 3 + ["settled"] * 9


def _first_of_a_period(slug: str, price, *, batched: bool) -> dict:
    """Four first requests of their budget periods and conversations, opened
    and finished in one transaction each or as one batch per phase; the
    first call's finish is sent twice."""
    from conversations import recording_sql

    app, key, budgets = _world(slug)
    names = {b.pk: b.name.replace(slug, "APP") for b in budgets}
    requests = [
        _request(key, budgets, price, request_id=f"r{n}", conversation=f"conv-{n % 2}", user=("alice", "bob")[n % 2])
        for n in range(4)
    ]
    opened = _write_all("open", [r.payload for r in requests], batched=batched)
    calls = [recording_sql.opened_call(o, r)[0] for r, o in zip(requests, opened)]
    finishing = [*calls, calls[0]]
    payloads = [recording_sql.finish_payload(call=c, result=_result())[0] for c in finishing]
    finished = _write_all("finish", payloads, batched=batched)
    return {
        "opened": [_periods(o["periods"], names) for o in opened],
        "finished": [{**f, "periods": _periods(f["periods"], names)} for f in finished],
        "rows": _snapshot(app),
    }


@pytest.mark.django_db(transaction=True)
def test_a_batch_of_first_requests_creates_each_period_and_conversation_once_and_records_a_call_once():
    """The first requests of a budget period arrive together: the batch
    creates each period row and each conversation once, holds in turn on
    them, and a call whose finish is sent twice is recorded and charged once
    -- the same books as one request after another."""
    _, price = make_model()
    single = _first_of_a_period("single1st", price, batched=False)
    batch = _first_of_a_period("batch1st", price, batched=True)

    assert batch["opened"] == single["opened"]
    assert batch["finished"] == single["finished"]
    for key in ("calls", "messages", "conversations", "reservations", "periods"):
        assert batch["rows"][key] == single["rows"][key], key
    # what a reader checks: 3 period rows per user pair (app, key, one per user), holds in turn, one record per call
    scopes = sorted((scope, subject != "") for scope, subject, _ in batch["rows"]["periods"])
    assert len(scopes) == 4 and [s for s, _ in scopes].count("end_user") == 2
    app_holds = [next(p["reserved_usd"] for p in o if p["budget"] == "APP app") for o in batch["opened"]]
    assert [Decimal(v) for v in app_holds] == [D("0.0002"), D("0.0004"), D("0.0006"), D("0.0008")]
    assert [f["recorded"] for f in batch["finished"]] == [True, True, True, True, False]
    assert [c["call_count"] for c in batch["rows"]["conversations"]] == [2, 2]
    assert len(batch["rows"]["calls"]) == 4 and all(c["status"] == "succeeded" for c in batch["rows"]["calls"])
    assert sorted(r["status"] for r in batch["rows"]["reservations"]) == ["settled"] * 12


@pytest.mark.django_db(transaction=True)
def test_a_finish_batch_locks_its_conversations_in_the_batchs_order():
    """Group commit sorts a batch by conversation key, and finishing its items
    one by one locked their conversations in that order, so two workers'
    batches could never wait on each other in a cycle (a deadlock fails a
    batch after a second). The set-based batch keeps that order, not the
    database's: here the key order ('a', 'b') is the reverse of the id order,
    and while another client holds 'b' the batch already holds 'a'."""
    import threading

    import orjson
    import psycopg

    from conversations import recording_sql

    _, price = make_model()
    app = make_application(slug="lock-order")
    key = create_api_key(application=app).api_key
    calls = {}
    for external_id in ("b", "a"):  # 'b' first: the lower id
        request = _request(key, [], price, request_id=f"r-{external_id}", conversation=external_id, user="", hold=D("0"), tokens=0)
        calls[external_id] = recording_sql.opened_call(recording_sql._fetch(recording_sql.OPEN_ONE, request.payload), request)[0]
    ids = dict(Conversation.objects.filter(application=app).values_list("external_id", "pk"))
    assert ids["b"] < ids["a"]
    batch = orjson.dumps([recording_sql.finish_payload(call=calls[e], result=_result())[0] for e in ("a", "b")], default=str).decode()

    holder, writer, probe = raw_connection(), raw_connection(autocommit=True), raw_connection(autocommit=True)
    out = {}

    def finish():
        try:
            out["recorded"] = writer.execute("SELECT gateway_finish_calls(%s::jsonb)", [batch]).fetchone()[0]
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    thread = threading.Thread(target=finish)
    try:
        holder.execute("SELECT 1 FROM conversations_conversation WHERE id = %s FOR UPDATE", [ids["b"]])
        thread.start()
        _wait_for_lock_waiter(probe)  # the batch waits for 'b' ...
        with pytest.raises(psycopg.errors.LockNotAvailable):  # ... holding 'a'
            probe.execute("SELECT 1 FROM conversations_conversation WHERE id = %s FOR UPDATE NOWAIT", [ids["a"]])
    finally:  # a failure must not leave a row locked for the teardown's flush
        holder.rollback()
        holder.close()
        thread.join(timeout=20)
        writer.close()
        probe.close()
    assert "error" not in out, out
    assert [f["recorded"] for f in out["recorded"]] == [True, True]
    assert sorted(Conversation.objects.filter(application=app).values_list("call_count", flat=True)) == [1, 1]


def _index_scans(name: str) -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s", [name])
        return cur.fetchone()[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sql_recording", [True, False], ids=["sql-functions", "orm"])
def test_finishing_a_call_looks_it_up_by_id_not_through_every_call_in_flight(settings, sql_recording):
    """The partial index of calls in progress matches the finish's status
    test; used for the lookup, it made every finish walk every call in flight
    and every entry finished calls left there until the next vacuum."""
    settings.GATEWAY = {**settings.GATEWAY, "SQL_RECORDING": sql_recording}
    _, price = make_model()
    app, key, budgets = _world("lookup")
    calls = [_open(key, budgets[1:2], price, request_id=f"in-flight-{n}", tokens=100)[0] for n in range(5)]
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
    before = _index_scans("call_in_progress_idx"), _index_scans("conversations_providercall_pkey")
    for call in calls:
        assert services.finish_call(call=call, result=_result()).recorded
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
    after = _index_scans("call_in_progress_idx"), _index_scans("conversations_providercall_pkey")
    assert after[0] == before[0], "a finish scanned the calls in progress"
    assert after[1] >= before[1] + len(calls)
    assert ProviderCall.objects.filter(application=app, status="succeeded").count() == 5


@pytest.mark.django_db(transaction=True)
def test_reaping_an_expired_hold_closes_its_call_by_id_not_through_every_call_in_flight():
    """The reaper closes each call whose hold expired. Found through the
    partial index of calls in progress, each close walked every call in
    flight; by primary key it touches only its own."""
    from datetime import timedelta

    from django.utils import timezone

    from budgets.services import expire_stale_reservations

    _, price = make_model()
    app, key, budgets = _world("reaped")
    calls = [_open(key, budgets[1:2], price, request_id=f"stale-{n}", tokens=100)[0] for n in range(5)]
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
    before = _index_scans("call_in_progress_idx")
    assert expire_stale_reservations(now=timezone.now() + timedelta(hours=1)) == 5
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_force_next_flush()")
    assert _index_scans("call_in_progress_idx") == before, "closing one call scanned the calls in progress"
    closed = ProviderCall.objects.filter(pk__in=[c.call_id for c in calls])
    assert sorted(closed.values_list("status", flat=True)) == ["interrupted"] * 5
    assert all("budget hold was released" in m for m in closed.values_list("error_message", flat=True))
