"""Helpers shared by the budget tests."""

import datetime as dt
from decimal import Decimal

from django.utils import timezone

from budgets.models import Budget
from conversations.models import ProviderCall


def make_budget(*, application=None, scope="application", limit_usd=None, limit_tokens=None, period="month", tz="UTC", **kw) -> Budget:
    budget = Budget(
        name=kw.pop("name", f"{scope} budget"), scope=scope, application=application, limit_usd=limit_usd,
        limit_tokens=limit_tokens, period=period, timezone=tz, **kw,
    )
    budget.full_clean()
    budget.save()
    return budget


def make_call(application=None, request_id="r") -> ProviderCall:
    return ProviderCall.objects.create(request_id=request_id, application=application, status="in_progress", created_at=timezone.now())


D = Decimal
UTC = dt.timezone.utc
