"""Budget status for managers: spent, held, remaining, utilisation, and a
forecast from the budget's own settled history (not a constant rate)."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Sum
from django.utils import timezone

from budgets.models import Budget, BudgetPeriod, Reservation
from budgets.periods import period_bounds
from budgets.services import utilisation_of

PACE_WINDOW = timedelta(days=3)
MIN_PACE_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    period_start: datetime
    period_end: datetime | None
    spent_usd: Decimal
    reserved_usd: Decimal
    spent_tokens: int
    reserved_tokens: int
    remaining_usd: Decimal | None
    remaining_tokens: int | None
    utilisation_percent: float
    pace_usd_per_hour: Decimal | None
    projected_usd: Decimal | None
    cap_reached_at: datetime | None
    subjects: int


def status(*, budget: Budget, now: datetime | None = None) -> BudgetStatus:
    """Current period totals (summed over subjects for per-end-user budgets)."""
    now = now or timezone.now()
    start, end = period_bounds(period=budget.period, tz_name=budget.timezone, at=now)
    rows = list(BudgetPeriod.objects.filter(budget=budget, period_start=start))
    spent = sum((r.spent_usd for r in rows), Decimal(0))
    reserved = sum((r.reserved_usd for r in rows), Decimal(0))
    spent_t = sum(r.spent_tokens for r in rows)
    reserved_t = sum(r.reserved_tokens for r in rows)
    per_subject = budget.scope == Budget.Scope.END_USER and not budget.end_user
    if per_subject and rows:
        top = max(rows, key=lambda r: (r.spent_usd + r.reserved_usd, r.spent_tokens + r.reserved_tokens))
        top.budget = budget
        util = utilisation_of(top)
    else:
        probe = BudgetPeriod(budget=budget, spent_usd=spent, reserved_usd=reserved, spent_tokens=spent_t, reserved_tokens=reserved_t)
        util = utilisation_of(probe)

    # Pace: settled spend per hour over the recent past (up to 3 days, within all periods).
    since = now - PACE_WINDOW
    first = (
        Reservation.objects.filter(budget_period__budget=budget, status=Reservation.Status.SETTLED, closed_at__gte=since)
        .order_by("closed_at")
        .values_list("closed_at", flat=True)
        .first()
    )
    pace = projected = cap_at = None
    if first is not None:
        window = max(now - first, MIN_PACE_WINDOW)
        settled = Reservation.objects.filter(
            budget_period__budget=budget, status=Reservation.Status.SETTLED, closed_at__gte=now - window
        ).aggregate(total=Sum("settled_usd"))["total"] or Decimal(0)
        hours = Decimal(window.total_seconds()) / Decimal(3600)
        pace = settled / hours
        if end is not None:
            projected = spent + pace * Decimal((end - now).total_seconds()) / Decimal(3600)
        if budget.limit_usd is not None and pace > 0 and not per_subject:
            left = budget.limit_usd - spent - reserved
            cap_at = now if left <= 0 else now + timedelta(hours=float(left / pace))
            if end is not None and cap_at >= end:
                cap_at = None  # not reached this period at the current pace
    remaining_usd = None if budget.limit_usd is None or per_subject else budget.limit_usd - spent - reserved
    remaining_t = None if budget.limit_tokens is None or per_subject else budget.limit_tokens - spent_t - reserved_t
    return BudgetStatus(
        budget=budget, period_start=start, period_end=end, spent_usd=spent, reserved_usd=reserved,
        spent_tokens=spent_t, reserved_tokens=reserved_t, remaining_usd=remaining_usd, remaining_tokens=remaining_t,
        utilisation_percent=util, pace_usd_per_hour=pace, projected_usd=projected, cap_reached_at=cap_at, subjects=len(rows),
    )
