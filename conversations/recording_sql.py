"""The gateway's two writes per call on Postgres, as one function call each.

Why: through the ORM, opening a call with three budgets took eleven statements
and finishing it nine, each compiled in Python and sent in its own round trip,
while the budget period rows stayed locked across those round trips. Every
request of an application queues on the same period rows, so that lock time
capped throughput at about 45 requests/s however many workers ran. The
functions (conversations migration 0004) do the same writes server-side: the
rows are locked for the function's microseconds and the commit.

Same inputs, same rows as the ORM path (conversations/services.py,
budgets/services.py), which stays the reference and what SQLite runs;
tests/test_recording_sql.py runs both on Postgres and compares what they wrote.
"""

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import orjson
from django.db import DatabaseError, connection
from django.utils import timezone

from budgets import readings
from budgets.models import Budget, BudgetPeriod
from budgets.services import BudgetExceeded, Hold, _keys, _raise_warnings, percent_used
from conversations.gateway import metrics
from conversations.group_commit import GroupCommit
from governance.db import fetch_prepared
from conversations.services import (
    CallResult,
    FinishedCall,
    OpenedCall,
    answer_row,
    conversation_title,
    cost_and_total,
    new_conversation_id,
    request_message_rows,
)


def _fetch(sql: str, payload) -> object:
    out = fetch_prepared(sql, (orjson.dumps(payload, default=str).decode(),))[0][0]
    # Django's psycopg setup hands jsonb back as text (its JSONField decodes).
    return orjson.loads(out) if isinstance(out, str | bytes) else out


BUDGET_FILLED_MEANWHILE = "GW001"  # raised by gateway_open_reserve (migration 0006)


def _open_one(payload: dict) -> dict:
    """Open one call in its own transaction. The function checks the hard caps
    before its inserts without locking the budget rows, and again under the
    lock; if a concurrent request took the headroom in between it rolls back
    (GW001) and the call is opened again with the rows locked first, which
    cannot race. Inside the caller's own transaction there is no second try,
    so the rows are locked first from the start."""
    if connection.in_atomic_block:
        return _fetch(OPEN_ONE, {**payload, "lock_first": True})
    try:
        return _fetch(OPEN_ONE, payload)
    except DatabaseError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != BUDGET_FILLED_MEANWHILE:
            raise
    metrics.BUDGET_RACES.inc()
    return _fetch(OPEN_ONE, {**payload, "lock_first": True})


OPEN_ONE, OPEN_MANY = "SELECT gateway_open_call(%s::jsonb)", "SELECT gateway_open_calls(%s::jsonb)"
FINISH_ONE, FINISH_MANY = "SELECT gateway_finish_call(%s::jsonb)", "SELECT gateway_finish_calls(%s::jsonb)"

# One writer per phase and process: concurrent requests' writes share
# transactions. A batch rejected by the server (GW001 included) is written
# again one request at a time.
OPENS = GroupCommit(name="open", single=_open_one, batch=lambda payloads: _fetch(OPEN_MANY, payloads))
FINISHES = GroupCommit(
    name="finish",
    single=lambda payload: _fetch(FINISH_ONE, payload),
    batch=lambda payloads: _fetch(FINISH_MANY, payloads),
)


def _percent(row: dict, budget: Budget) -> float:
    return percent_used(
        budget,
        spent_usd=Decimal(row["spent_usd"]),
        reserved_usd=Decimal(row["reserved_usd"]),
        spent_tokens=row["spent_tokens"],
        reserved_tokens=row["reserved_tokens"],
    )


def _period(row: dict, budget: Budget) -> BudgetPeriod:
    period = BudgetPeriod(
        pk=row["id"],
        budget_id=row["budget_id"],
        spent_usd=Decimal(row["spent_usd"]),
        reserved_usd=Decimal(row["reserved_usd"]),
        spent_tokens=row["spent_tokens"],
        reserved_tokens=row["reserved_tokens"],
        warned_at_percent=row.get("warned_at_percent", 0),
    )
    period.budget = budget
    return period


def open_payload(
    *,
    budgets: list[Budget],
    hold_usd: Decimal,
    hold_tokens: int,
    ttl_s: float,
    request_id: str,
    api_key,
    conversation_external_id: str | None,
    end_user: str,
    step: str,
    stream: bool,
    model_requested: str,
    model_used: str,
    parameters: dict,
    messages: list[dict],
    price,
    estimated_prompt_tokens: int,
    token_count_is_estimate: bool,
    provider_base_url: str,
    decisions: list | None = None,
) -> tuple[dict, str]:
    """What gateway_open_call takes, and the conversation id it will use."""
    now = timezone.now()
    external_id = conversation_external_id or new_conversation_id()
    payload = {
        "now": now,
        "request_id": request_id,
        "application_id": api_key.application_id,
        "api_key_id": api_key.pk,
        "key_prefix": api_key.prefix,
        "external_id": external_id,
        "end_user": end_user,
        "title": conversation_title(messages),
        "step": step,
        "stream": stream,
        "model_requested": model_requested,
        "model_used": model_used,
        "parameters": parameters,
        "decisions": decisions or [],
        "estimated_prompt_tokens": estimated_prompt_tokens,
        "token_count_is_estimate": token_count_is_estimate,
        "price_id": price.pk if price is not None else None,
        "provider_base_url": provider_base_url,
        "messages": request_message_rows(messages),
    }
    if budgets:
        payload.update(
            budgets=[
                {"budget_id": b.pk, "subject": subject, "period_start": start, "period_end": end}
                for b, subject, start, end in _keys(budgets, end_user, now)
            ],
            hold_usd=hold_usd,
            hold_tokens=hold_tokens,
            expires_at=now + timedelta(seconds=ttl_s),
        )
    return payload, external_id


@dataclass
class OpenRequest:
    """One call to open: the function's payload and the arguments it came from."""

    payload: dict
    external_id: str
    fields: dict

    @classmethod
    def of(cls, **fields) -> "OpenRequest":
        payload, external_id = open_payload(**fields)
        return cls(payload, external_id, fields)

    @property
    def order(self) -> tuple:
        return (self.fields["api_key"].application_id, self.external_id)


def open_call_with_holds(**fields) -> tuple[OpenedCall, list[Hold]]:
    """Takes open_payload's arguments."""
    request = OpenRequest.of(**fields)
    return opened_call(OPENS.submit(request.payload, order=request.order), request)


def open_call_if_idle(request: OpenRequest) -> tuple[OpenedCall, list[Hold]] | None:
    """On a database thread: open the call here if no other open is being
    written (what open_call_with_holds returns); otherwise None, and the
    caller waits with open_call_with_holds_async."""
    out = OPENS.write_if_idle(request.payload, order=request.order)
    return None if out is None else opened_call(out, request)


async def open_call_with_holds_async(request: OpenRequest) -> tuple[OpenedCall, list[Hold]]:
    """From the event loop: the request waits for the shared transaction
    without holding a database thread; only a refusal reads the database, on a
    database thread."""
    from conversations.gateway.dbsection import db_section

    out = await OPENS.submit_async(request.payload, order=request.order)
    if "exceeded" in out:
        return await db_section(opened_call, out=out, request=request)
    return opened_call(out, request)


def opened_call(out: dict, request: OpenRequest) -> tuple[OpenedCall, list[Hold]]:
    """What the open function answered, as the ORM path's return value (or
    its BudgetExceeded, which reads the budget as it stands now)."""
    fields, external_id = request.fields, request.external_id
    budgets, api_key, hold_usd, hold_tokens = fields["budgets"], fields["api_key"], fields["hold_usd"], fields["hold_tokens"]
    by_id = {b.pk: b for b in budgets}
    if "exceeded" in out:
        row = out["exceeded"]
        budget = Budget.objects.get(pk=row["budget_id"])  # as it stands now, for the message
        raise BudgetExceeded(
            budget=budget,
            period=_period({"id": row["period_id"], **row}, budget),
            needed_usd=hold_usd,
            needed_tokens=hold_tokens,
            unit=row["unit"],
        )
    if out["periods"]:
        readings.observe(
            out["periods"],
            keys={k["budget_id"]: (k["budget_id"], k["subject"], k["period_start"]) for k in request.payload["budgets"]},
        )
    holds = []
    for row in out["periods"] or ():
        budget = by_id[row["budget_id"]]
        holds.append(
            Hold(
                budget_id=budget.pk,
                budget_name=budget.name,
                period_id=row["id"],
                amount_usd=hold_usd,
                tokens=hold_tokens,
                utilisation_after=_percent(row, budget),
            )
        )
    opened = OpenedCall(
        call_id=out["call_id"],
        conversation_id=out["conversation_id"],
        conversation_external_id=external_id,
        application_id=api_key.application_id,
        price=fields["price"],
        decisions=list(fields.get("decisions") or []),
        has_holds=bool(holds),
        budgets=list(budgets) if holds else [],
    )
    return opened, holds


def finish_payload(*, call: OpenedCall, result: CallResult) -> tuple[dict, Decimal | None]:
    """What gateway_finish_call takes, and the cost it charges."""
    price, cost, total = cost_and_total(call=call, result=result)
    payload = {
        "now": timezone.now(),
        "call_id": call.call_id,
        "conversation_id": call.conversation_id,
        "has_holds": call.has_holds,
        "attempts": result.attempts,
        "status": result.status,
        "outcome": result.outcome,
        "http_status": result.http_status,
        "error_type": result.error_type,
        "error_code": result.error_code,
        "error_message": result.error_message[:2000],
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
        "reasoning_tokens": result.reasoning_tokens,
        "total_tokens": total,
        "usage_source": result.usage_source,
        "cost_usd": cost,
        "finish_reason": result.finish_reason[:32],
        "provider_response_id": result.provider_response_id[:128],
        "decisions": [*call.decisions, *result.decisions],
        "latency_ms": result.latency_ms,
        "provider_latency_ms": result.provider_latency_ms,
    }
    if result.model_used:
        payload.update(model_used=result.model_used, price_id=price.pk if price is not None else None)
    answer = answer_row(result)
    if answer:
        if answer["parts"] is None:
            del answer["parts"]
        payload["answer"] = answer
    return payload, cost


def _finish_order(call: OpenedCall) -> tuple:
    return (call.application_id or 0, call.conversation_external_id or "")


def finish_call(*, call: OpenedCall, result: CallResult) -> FinishedCall:
    payload, cost = finish_payload(call=call, result=result)
    out = FINISHES.submit(payload, order=_finish_order(call))
    readings.observe(out["periods"] or ())
    if out["settled"] and out["periods"]:
        _warn(call, out["periods"])
    return FinishedCall(recorded=out["recorded"], cost_usd=cost if out["recorded"] else None)


async def finish_call_async(*, call: OpenedCall, result: CallResult) -> FinishedCall:
    """The same from the event loop. A fallback's price is read from the
    database, so a call a fallback answered is finished on a database thread;
    so is the rare budget warning."""
    from conversations.gateway.dbsection import db_section

    if result.price_id is not None:
        return await db_section(finish_call, call=call, result=result)
    payload, cost = finish_payload(call=call, result=result)
    out = await FINISHES.submit_async(payload, order=_finish_order(call))
    readings.observe(out["periods"] or ())
    if out["settled"] and out["periods"] and _may_warn(call, out["periods"]):
        await db_section(_warn, call=call, rows=out["periods"])
    return FinishedCall(recorded=out["recorded"], cost_usd=cost if out["recorded"] else None)


def _may_warn(call: OpenedCall, rows: list[dict]) -> bool:
    """Whether _warn has anything to do (without a query): a settled row
    crossed one of its budget's thresholds, or its budget is not at hand."""
    known = {b.pk: b for b in call.budgets}
    return any(row["budget_id"] not in known or _crosses(row, known[row["budget_id"]]) for row in rows)


def _crosses(row: dict, budget: Budget) -> bool:
    """The settled row passed a warning threshold not yet warned about."""
    pct = _percent(row, budget)
    return any(pct >= t > row["warned_at_percent"] for t in (budget.warn_at or []))


def _warn(call: OpenedCall, rows: list[dict]) -> None:
    """Budget warnings from the settled rows (the rare crossing is written by
    the same conditional update as on the ORM path)."""
    known = {b.pk: b for b in call.budgets}
    missing = {r["budget_id"] for r in rows} - set(known)
    if missing:
        known.update(Budget.objects.in_bulk(missing))
    crossing = [row for row in rows if _crosses(row, known[row["budget_id"]])]
    if crossing:
        periods = {p.pk: p for p in BudgetPeriod.objects.filter(pk__in=[r["id"] for r in crossing])}
        for row in crossing:
            periods[row["id"]].budget = known[row["budget_id"]]
        _raise_warnings(list(periods.values()))
