"""Writes for an application's traffic: opening a call before the provider is
asked, finishing it afterwards, and recording requests refused before that.

Each function is one transaction, so a crash leaves either nothing or a
complete, consistent step: an `in_progress` call with its request messages, or
a final call with its answer and the conversation totals updated.
"""

import functools
import hashlib
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

import orjson
from django.db import transaction
from django.db.models import BooleanField, F, Func, Value
from django.utils import timezone

from budgets.models import ModelPrice
from budgets.selectors import cost_of
from conversations.gateway.validation import text_of
from conversations.models import Conversation, Message, ProviderCall
from governance.models import ApiKey, Application


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def request_message_rows(messages: list[dict]) -> list[dict]:
    """The stored form of each request message (text, structured parts, digest),
    shared by the ORM and the Postgres function path."""
    rows = []
    for position, msg in enumerate(messages):
        content = msg.get("content")
        text = text_of(content)
        extra = {}
        if isinstance(content, list):
            extra["content"] = content
        for key in ("tool_calls", "tool_call_id", "function_call"):
            if msg.get(key) is not None:
                extra[key] = msg[key]
        rows.append(
            {
                "position": position,
                "role": msg["role"],
                "name": (msg.get("name") or "")[:64],
                "content": text,
                "parts": extra or None,
                "sha": sha256(msg["role"] + "\x1f" + text + "\x1f" + (orjson.dumps(extra).decode() if extra else "")),
            }
        )
    return rows


def answer_row(result: "CallResult") -> dict | None:
    if not (result.content or result.tool_calls):
        return None
    parts = {"tool_calls": result.tool_calls} if result.tool_calls else None
    return {
        "content": result.content,
        "parts": parts,
        "sha": sha256("assistant\x1f" + result.content + "\x1f" + (orjson.dumps(parts).decode() if parts else "")),
    }


def _message_rows(*, conversation, call, messages: list[dict], now) -> list[Message]:
    return [
        Message(
            conversation=conversation,
            call=call,
            direction=Message.Direction.REQUEST,
            position=row["position"],
            role=row["role"],
            name=row["name"],
            content=row["content"],
            parts=row["parts"],
            content_sha256=row["sha"],
            created_at=now,
        )
        for row in request_message_rows(messages)
    ]


def new_conversation_id() -> str:
    return "auto_" + uuid.uuid4().hex


def conversation_title(messages: list[dict]) -> str:
    first_user = next((text_of(m.get("content")) for m in messages if m.get("role") == "user"), "")
    return " ".join(first_user.split())[:120]


def _conversation(*, application: Application, external_id: str | None, end_user: str, messages, now) -> Conversation:
    if not external_id:
        external_id = new_conversation_id()
    else:
        # An existing conversation is only read here: its last activity moves
        # when the call finishes (rewriting the row at open too cost an extra
        # row version and index entries on every request).
        existing = Conversation.objects.filter(application=application, external_id=external_id).only("id", "external_id").first()
        if existing is not None:
            return existing
    defaults = {
        "end_user": end_user,
        "title": conversation_title(messages),
        "started_at": now,
        "last_activity_at": now,
    }
    # One upsert instead of get-or-create's savepoints: safe when many requests
    # of one conversation arrive together, and RETURNING gives the id either way.
    conv = Conversation(application=application, external_id=external_id, **defaults)
    Conversation.objects.bulk_create(
        [conv], update_conflicts=True, unique_fields=["application", "external_id"], update_fields=["last_activity_at"]
    )
    return conv


@dataclass
class OpenedCall:
    """What finishing the call needs, kept from opening it (no re-read)."""

    call_id: int
    conversation_id: int
    conversation_external_id: str
    application_id: int | None = None  # with the conversation id, the order batched writes take locks in
    price: ModelPrice | None = None
    decisions: list = field(default_factory=list)
    has_holds: bool = False
    budgets: list = field(default_factory=list)  # those holding, for warnings at settlement


@transaction.atomic(savepoint=False)
def open_call(
    *,
    request_id: str,
    api_key: ApiKey,
    conversation_external_id: str | None,
    end_user: str,
    step: str,
    stream: bool,
    model_requested: str,
    model_used: str,
    parameters: dict,
    messages: list[dict],
    price: ModelPrice,
    estimated_prompt_tokens: int,
    token_count_is_estimate: bool,
    provider_base_url: str,
    decisions: list | None = None,
) -> OpenedCall:
    now = timezone.now()
    conv = _conversation(
        application=api_key.application,
        external_id=conversation_external_id,
        end_user=end_user,
        messages=messages,
        now=now,
    )
    call = ProviderCall.objects.create(
        request_id=request_id,
        application=api_key.application,
        api_key=api_key,
        key_prefix=api_key.prefix,
        conversation=conv,
        end_user=end_user,
        step=step,
        stream=stream,
        model_requested=model_requested,
        model_used=model_used,
        parameters=parameters,
        status=ProviderCall.Status.IN_PROGRESS,
        decisions=decisions or [],
        estimated_prompt_tokens=estimated_prompt_tokens,
        token_count_is_estimate=token_count_is_estimate,
        price=price,
        provider_base_url=provider_base_url,
        created_at=now,
    )
    Message.objects.bulk_create(_message_rows(conversation=conv, call=call, messages=messages, now=now))
    return OpenedCall(
        call_id=call.pk,
        conversation_id=conv.pk,
        conversation_external_id=conv.external_id,
        application_id=api_key.application_id,
        price=price,
        decisions=list(decisions or []),
    )


def sql_recording() -> bool:
    """Whether the gateway's writes go through the Postgres functions
    (migration conversations 0004) instead of the ORM."""
    from django.conf import settings

    return settings.GATEWAY["SQL_RECORDING"] and _vendor() == "postgresql"


@functools.cache
def _vendor() -> str:
    from django.db import connection

    return connection.vendor


def open_call_with_holds(
    *, budgets: list, hold_usd: Decimal, hold_tokens: int, ttl_s: float, **call_fields
) -> tuple[OpenedCall, list]:
    """Open the call and hold its worst case on every budget, in one
    transaction: all or nothing (raises budgets.services.BudgetExceeded)."""
    if sql_recording():
        from conversations import recording_sql

        return recording_sql.open_call_with_holds(
            budgets=budgets, hold_usd=hold_usd, hold_tokens=hold_tokens, ttl_s=ttl_s, **call_fields
        )
    from budgets.services import reserve

    with transaction.atomic():
        opened = open_call(**call_fields)
        holds = reserve(
            call_id=opened.call_id,
            budgets=budgets,
            end_user=call_fields["end_user"],
            amount_usd=hold_usd,
            tokens=hold_tokens,
            ttl_s=ttl_s,
        )
    opened.has_holds = bool(holds)
    return opened, holds


@dataclass
class CallResult:
    status: str
    outcome: str
    http_status: int
    latency_ms: int
    provider_latency_ms: int | None = None
    error_type: str = ""
    error_code: str = ""
    error_message: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    usage_source: str = "none"
    content: str = ""
    tool_calls: list | None = None
    finish_reason: str = ""
    provider_response_id: str = ""
    provider_model: str = ""
    decisions: list = field(default_factory=list)
    attempts: list = field(default_factory=list)
    model_used: str = ""  # set when a fallback answered
    price_id: int | None = None  # the fallback's price
    cost_override: Decimal | None = None  # a cache hit costs nothing


@dataclass
class FinishedCall:
    recorded: bool
    cost_usd: Decimal | None


def cost_and_total(*, call: OpenedCall, result: CallResult) -> tuple[ModelPrice | None, Decimal | None, int | None]:
    """The price billed (a fallback's, if one answered), the cost and the total tokens."""
    price = call.price
    if result.price_id is not None:
        price = ModelPrice.objects.get(pk=result.price_id)
    cost = None
    if result.cost_override is not None:
        cost = result.cost_override
    elif result.prompt_tokens is not None and price is not None:
        cost = cost_of(
            price=price,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens or 0,
            cached_tokens=result.cached_tokens or 0,
        )
    total = None
    if result.prompt_tokens is not None:
        total = result.prompt_tokens + (result.completion_tokens or 0)
    return price, cost, total


def finish_call(*, call: OpenedCall, result: CallResult) -> FinishedCall:
    """Make an in-progress call final and settle (or release) its budget holds,
    in one transaction. A call already final (say, marked interrupted by a
    reaper) is left alone and reported as not recorded."""
    if sql_recording():
        from conversations import recording_sql

        return recording_sql.finish_call(call=call, result=result)
    return _finish_call_orm(call=call, result=result)


def _still_in_progress() -> Func:
    """status = 'in_progress', written `(...) IS TRUE` so that Postgres cannot
    prove the partial index of calls in progress from it: given that index for
    a lookup by id, the planner scanned all of it (every call in flight and
    every entry left since the last vacuum) instead of using the primary key.
    The reaper's bulk close wants exactly that index, and keeps the plain test
    (close_as_interrupted); closing one call by id does not."""
    return Func(
        F("status"), Value(ProviderCall.Status.IN_PROGRESS), arg_joiner=" = ", template="((%(expressions)s) IS TRUE)",
        output_field=BooleanField(),
    )


@transaction.atomic
def _finish_call_orm(*, call: OpenedCall, result: CallResult) -> FinishedCall:
    call_id = call.call_id
    price, cost, total = cost_and_total(call=call, result=result)
    now = timezone.now()
    route = {"model_used": result.model_used, "price": price} if result.model_used else {}
    updated = ProviderCall.objects.filter(_still_in_progress(), pk=call_id).update(
        **route,
        attempts=result.attempts,
        status=result.status,
        outcome=result.outcome,
        http_status=result.http_status,
        error_type=result.error_type,
        error_code=result.error_code,
        error_message=result.error_message[:2000],
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cached_tokens=result.cached_tokens,
        reasoning_tokens=result.reasoning_tokens,
        total_tokens=total,
        usage_source=result.usage_source,
        cost_usd=cost,
        finish_reason=result.finish_reason[:32],
        provider_response_id=result.provider_response_id[:128],
        decisions=[*call.decisions, *result.decisions],
        latency_ms=result.latency_ms,
        provider_latency_ms=result.provider_latency_ms,
        completed_at=now,
    )
    if call.has_holds:
        _settle_budgets(call_id=call_id, cost=cost, tokens=total)
    if updated != 1:
        return FinishedCall(recorded=False, cost_usd=None)
    answer = answer_row(result)
    if answer:
        Message.objects.bulk_create(
            [
                Message(
                    conversation_id=call.conversation_id,
                    call_id=call_id,
                    direction=Message.Direction.RESPONSE,
                    position=0,
                    role="assistant",
                    content=answer["content"],
                    parts=answer["parts"],
                    content_sha256=answer["sha"],
                    created_at=now,
                )
            ]
        )
    Conversation.objects.filter(pk=call.conversation_id).update(
        last_activity_at=now,
        call_count=F("call_count") + 1,
        total_tokens=F("total_tokens") + (total or 0),
        total_cost_usd=F("total_cost_usd") + (cost or Decimal(0)),
    )
    return FinishedCall(recorded=True, cost_usd=cost)


def _settle_budgets(*, call_id: int, cost: Decimal | None, tokens: int | None) -> None:
    """Charge what the provider reported (even for a call already closed by the
    reaper: the work was done); release the holds of a call that cost nothing."""
    from budgets import services as budgets

    if cost is not None:
        budgets.settle(call_id=call_id, cost_usd=cost, tokens=tokens or 0)
    else:
        budgets.release(call_id=call_id)


@transaction.atomic
def record_rejection(
    *,
    request_id: str,
    http_status: int,
    status: str,
    outcome: str,
    error_type: str,
    error_code: str,
    error_message: str,
    latency_ms: int,
    api_key: ApiKey | None = None,
    key_prefix: str = "",
    model_requested: str = "",
    stream: bool = False,
    end_user: str = "",
    step: str = "",
    parameters: dict | None = None,
    decisions: list | None = None,
    estimated_prompt_tokens: int | None = None,
) -> ProviderCall:
    """A request refused before the provider was asked. No conversation is
    touched and no message stored: nothing reached the model."""
    now = timezone.now()
    return ProviderCall.objects.create(
        request_id=request_id,
        application=api_key.application if api_key else None,
        api_key=api_key,
        key_prefix=key_prefix or (api_key.prefix if api_key else ""),
        end_user=end_user[:128],
        step=step[:64],
        stream=stream,
        model_requested=model_requested[:100],
        parameters=parameters or {},
        status=status,
        outcome=outcome,
        http_status=http_status,
        error_type=error_type,
        error_code=error_code,
        error_message=error_message[:2000],
        decisions=decisions or [],
        estimated_prompt_tokens=estimated_prompt_tokens,
        latency_ms=latency_ms,
        created_at=now,
        completed_at=now,
    )


INTERRUPTED = "The gateway process handling this call stopped before it finished."


def close_as_interrupted(*, calls=None, call_id: int | None = None, now=None, message: str = INTERRUPTED) -> int:
    """Close still-open calls as interrupted: those of a queryset (the bulk
    close, through the partial index of calls in progress) or one by its id
    (by primary key: see _still_in_progress). A deliberate queryset update
    (no per-row signals); the status test means a call finishing at this
    very moment is never touched."""
    now = now or timezone.now()
    if call_id is not None:
        calls = ProviderCall.objects.filter(_still_in_progress(), pk=call_id)
    else:
        calls = calls.filter(status=ProviderCall.Status.IN_PROGRESS)
    return calls.update(
        status=ProviderCall.Status.INTERRUPTED,
        outcome=ProviderCall.Outcome.FAILED,
        error_type="api_error",
        error_code="interrupted",
        error_message=message,
        completed_at=now,
    )


def mark_interrupted_calls(*, older_than_s: float | None = None) -> int:
    """Close calls left `in_progress` by a process that died mid-call. Calls
    with budget holds are usually closed earlier, when their hold expires."""
    from django.conf import settings

    if older_than_s is None:
        older_than_s = settings.GATEWAY["PROVIDER_TIMEOUT_S"] * 2 + 60
    cutoff = timezone.now() - timezone.timedelta(seconds=older_than_s)
    return close_as_interrupted(calls=ProviderCall.objects.filter(created_at__lt=cutoff))


@transaction.atomic
def flag_answer(*, call: ProviderCall, reason: str, api_key: ApiKey | None = None, user=None):
    from conversations.models import AnswerFlag

    return AnswerFlag.objects.create(call=call, reason=reason, raised_by_key=api_key, raised_by_user=user)
