"""Test data built directly through the ORM (no gateway involved).

Messages are append-only: they are created once, with bulk_create. Provider
calls can only be updated while in progress, so they are created final.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.utils import timezone

from budgets.models import LanguageModel, ModelPrice
from budgets.selectors import cost_of
from conversations.models import Conversation, Message, ProviderCall
from governance.models import Application

PASSWORD = "correct-horse-battery-staple"
_seq = itertools.count(1)


def message_hash(role: str, content: str, parts: dict | None = None) -> str:
    """Same recipe as conversations.services: role, text and structured parts."""
    import json

    extra = json.dumps(parts, separators=(",", ":")) if parts else ""
    return hashlib.sha256(f"{role}\x1f{content}\x1f{extra}".encode()).hexdigest()


def make_user(*, username: str, role: str | None = None, superuser: bool = False, password: str = PASSWORD):
    User = get_user_model()
    if superuser:
        return User.objects.create_superuser(username=username, email=f"{username}@example.com", password=password)
    user = User.objects.create_user(username=username, password=password, is_staff=True)
    if role:
        user.groups.add(Group.objects.get(name=role))
    return user


def make_model(
    *,
    name: str = "gpt-4o-mini",
    input_per_million: str = "0.15",
    cached_input_per_million: str | None = "0.075",
    output_per_million: str = "0.60",
    effective_from: datetime | None = None,
) -> tuple[LanguageModel, ModelPrice]:
    model, _ = LanguageModel.objects.get_or_create(name=name)
    price = ModelPrice.objects.create(
        model=model,
        # Whole seconds, as the admin's date/time inputs enter them.
        effective_from=effective_from or (timezone.now() - timedelta(days=30)).replace(microsecond=0),
        input_per_million=Decimal(input_per_million),
        cached_input_per_million=Decimal(cached_input_per_million) if cached_input_per_million else None,
        output_per_million=Decimal(output_per_million),
    )
    return model, price


def make_application(*, slug: str = "support-bot", name: str | None = None, default_model: str = "gpt-4o-mini") -> Application:
    return Application.objects.create(
        slug=slug, name=name or slug.replace("-", " ").title(), default_model=default_model, status="production"
    )


@dataclass
class Turn:
    user: str
    answer: str | None  # None: the call failed, nothing answered
    request_id: str = ""
    outcome: str = "answered"
    model_used: str = ""
    decisions: list = field(default_factory=list)
    error_code: str = ""


def make_conversation(
    *,
    application: Application,
    price: ModelPrice,
    turns: list[Turn],
    external_id: str | None = None,
    end_user: str = "",
    system: str = "You are the support assistant of Example Ltd.",
    started_at: datetime | None = None,
    model_requested: str | None = None,
) -> Conversation:
    """A conversation whose calls each re-send the whole history, like a chat
    client does: system, then every earlier user turn and answer, then the new
    user turn. A failed turn (answer None) is retried by the next one."""
    n = next(_seq)
    started = started_at or timezone.now() - timedelta(hours=1)
    conversation = Conversation.objects.create(
        application=application,
        external_id=external_id or f"conv-{n}",
        end_user=end_user,
        title=turns[0].user[:120] if turns else "",
        started_at=started,
        last_activity_at=started,
    )
    history: list[tuple[str, str]] = [("system", system)]
    messages: list[Message] = []
    total_tokens, total_cost = 0, Decimal(0)
    model_name = price.model.name
    for i, turn in enumerate(turns):
        at = started + timedelta(minutes=i)
        request = [*history, ("user", turn.user)]
        answered = turn.answer is not None
        prompt = 40 * len(request)
        completion = 25 if answered else 0
        cached = 40 * len(history) if i else 0
        cost = cost_of(price=price, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
        failed = not answered
        call = ProviderCall.objects.create(
            request_id=turn.request_id or f"req_{n}_{i}",
            application=application,
            conversation=conversation,
            end_user=end_user,
            model_requested=model_requested or model_name,
            model_used=turn.model_used or model_name,
            status=ProviderCall.Status.FAILED if failed else ProviderCall.Status.SUCCEEDED,
            outcome=ProviderCall.Outcome.FAILED if failed else turn.outcome,
            http_status=502 if failed else 200,
            error_type="upstream_error" if failed else "",
            error_code=turn.error_code or ("provider_unavailable" if failed else ""),
            error_message="The provider did not answer after 3 attempts." if failed else "",
            decisions=turn.decisions,
            prompt_tokens=None if failed else prompt,
            cached_tokens=None if failed else cached,
            completion_tokens=None if failed else completion,
            total_tokens=None if failed else prompt + completion,
            usage_source="none" if failed else "provider",
            price=price,
            cost_usd=None if failed else cost,
            finish_reason="" if failed else "stop",
            latency_ms=800 + 10 * i,
            provider_latency_ms=None if failed else 700 + 10 * i,
            created_at=at,
            completed_at=at + timedelta(seconds=1),
        )
        for position, (role, content) in enumerate(request):
            messages.append(
                Message(
                    conversation=conversation,
                    call=call,
                    direction=Message.Direction.REQUEST,
                    position=position,
                    role=role,
                    content=content,
                    content_sha256=message_hash(role, content),
                    created_at=at,
                )
            )
        if answered:
            messages.append(
                Message(
                    conversation=conversation,
                    call=call,
                    direction=Message.Direction.RESPONSE,
                    position=0,
                    role="assistant",
                    content=turn.answer,
                    content_sha256=message_hash("assistant", turn.answer),
                    created_at=at + timedelta(seconds=1),
                )
            )
            history = [*request, ("assistant", turn.answer)]
            total_tokens += prompt + completion
            total_cost += cost
    Message.objects.bulk_create(messages)
    # Totals as the recording service keeps them (a plain UPDATE: conversations are not append-only).
    Conversation.objects.filter(pk=conversation.pk).update(
        call_count=len(turns),
        total_tokens=total_tokens,
        total_cost_usd=total_cost,
        last_activity_at=started + timedelta(minutes=max(len(turns) - 1, 0), seconds=1),
    )
    conversation.refresh_from_db()
    return conversation


def make_rejected_call(*, request_id: str, application: Application | None = None, code: str = "invalid_api_key") -> ProviderCall:
    """A request refused before any provider was asked: no conversation, maybe no application."""
    now = timezone.now()
    return ProviderCall.objects.create(
        request_id=request_id,
        application=application,
        status=ProviderCall.Status.REFUSED,
        outcome=ProviderCall.Outcome.REFUSED,
        http_status=401 if application is None else 429,
        error_type="invalid_request_error",
        error_code=code,
        error_message="Incorrect API key provided." if application is None else "Budget exceeded.",
        latency_ms=3,
        created_at=now,
        completed_at=now,
    )


def admin_url(name: str, *args) -> str:
    """An admin URL by its short name, e.g. admin_url("budgets_budget_change", pk)."""
    from django.urls import reverse

    return reverse(f"admin:{name}", args=args)
