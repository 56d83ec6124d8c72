"""Budget accounting: reserve the worst case before a call, settle the actual
cost after, release on failure, expire what a dead process left behind.

Correctness under concurrency rests on one rule: every change to a period's
spent/reserved happens while holding that BudgetPeriod row's lock, and rows are
always locked in primary-key order (no deadlocks). Reservation state changes
are conditional updates, so settle, release and expiry can race without ever
counting a hold twice.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import orjson
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from budgets import readings
from budgets.models import Budget, BudgetPeriod, CostEvent, Reservation
from budgets.periods import period_bounds


class BudgetExceeded(Exception):
    def __init__(self, *, budget: Budget, period: BudgetPeriod, needed_usd: Decimal, needed_tokens: int, unit: str):
        self.budget = budget
        self.period = period
        self.needed_usd = needed_usd
        self.needed_tokens = needed_tokens
        self.unit = unit
        if unit == "usd":
            left = budget.limit_usd - period.spent_usd - period.reserved_usd
            msg = (
                f"Budget '{budget.name}' is exhausted: this request could cost up to ${needed_usd:.6f} "
                f"and ${max(left, Decimal(0)):.6f} of ${budget.limit_usd:.2f} remains this period."
            )
        else:
            left = budget.limit_tokens - period.spent_tokens - period.reserved_tokens
            msg = (
                f"Budget '{budget.name}' is exhausted: this request could use up to {needed_tokens:,} tokens "
                f"and {max(left, 0):,} of {budget.limit_tokens:,} remain this period."
            )
        super().__init__(msg)
        self.message = msg


def subject_for(budget: Budget, end_user: str) -> str:
    return end_user if budget.scope == Budget.Scope.END_USER and not budget.end_user else ""


def _keys(budgets: list[Budget], end_user: str, at: datetime) -> list[tuple[Budget, str, datetime, datetime | None]]:
    out = []
    for budget in budgets:
        start, end = period_bounds(period=budget.period, tz_name=budget.timezone, at=at)
        out.append((budget, subject_for(budget, end_user), start, end))
    return out


def _existing_rows(keys) -> dict[tuple[int, str, datetime], BudgetPeriod]:
    """The current rows of several budgets in one query."""
    if not keys:
        return {}
    q = Q()
    for budget, subject, start, _ in keys:
        q |= Q(budget_id=budget.pk, subject=subject, period_start=start)
    return {(r.budget_id, r.subject, r.period_start): r for r in BudgetPeriod.objects.filter(q)}


def period_rows(*, budgets: list[Budget], end_user: str, at: datetime) -> list[BudgetPeriod]:
    """The accounting row of each budget for the period containing `at`,
    created on first use (concurrent first uses converge on one row)."""
    keys = _keys(budgets, end_user, at)
    existing = _existing_rows(keys)
    rows = []
    for budget, subject, start, end in keys:
        row = existing.get((budget.pk, subject, start))
        if row is None:
            key = {"budget": budget, "subject": subject, "period_start": start}
            try:
                with transaction.atomic():
                    row = BudgetPeriod.objects.create(period_end=end, **key)
            except IntegrityError:
                row = BudgetPeriod.objects.get(**key)
        row.budget = budget
        rows.append(row)
    return rows


def _lock(period_ids) -> dict[int, BudgetPeriod]:
    return {
        p.pk: p
        # lock only the period rows (not the budgets joined for reading)
        for p in BudgetPeriod.objects.select_for_update(of=("self",)).select_related("budget").filter(pk__in=set(period_ids)).order_by("pk")
    }


@dataclass(frozen=True)
class Hold:
    budget_id: int
    budget_name: str
    period_id: int
    amount_usd: Decimal
    tokens: int
    utilisation_after: float


def reserve(
    *,
    call_id: int,
    budgets: list[Budget],
    end_user: str,
    amount_usd: Decimal,
    tokens: int,
    ttl_s: float,
    at: datetime | None = None,
) -> list[Hold]:
    """Hold `amount_usd`/`tokens` on every budget, or on none: raises
    BudgetExceeded (and the caller's transaction rolls back) if any hard cap
    would be passed. Must run inside the caller's transaction."""
    if not budgets:
        return []
    at = at or timezone.now()
    rows = period_rows(budgets=budgets, end_user=end_user, at=at)
    locked = _lock(r.pk for r in rows)
    for period in locked.values():
        budget = period.budget
        if not budget.hard_cap:
            continue
        if budget.limit_usd is not None and period.spent_usd + period.reserved_usd + amount_usd > budget.limit_usd:
            raise BudgetExceeded(budget=budget, period=period, needed_usd=amount_usd, needed_tokens=tokens, unit="usd")
        if budget.limit_tokens is not None and period.spent_tokens + period.reserved_tokens + tokens > budget.limit_tokens:
            raise BudgetExceeded(budget=budget, period=period, needed_usd=amount_usd, needed_tokens=tokens, unit="tokens")
    expires = at + timedelta(seconds=ttl_s)
    # Every budget holds the same amount: one statement for all of them.
    BudgetPeriod.objects.filter(pk__in=list(locked)).update(
        reserved_usd=F("reserved_usd") + amount_usd, reserved_tokens=F("reserved_tokens") + tokens
    )
    holds = []
    for period in locked.values():
        period.reserved_usd += amount_usd
        period.reserved_tokens += tokens
        holds.append(
            Hold(
                budget_id=period.budget_id,
                budget_name=period.budget.name,
                period_id=period.pk,
                amount_usd=amount_usd,
                tokens=tokens,
                utilisation_after=utilisation_of(period),
            )
        )
    Reservation.objects.bulk_create(
        [
            Reservation(call_id=call_id, budget_period_id=p.pk, amount_usd=amount_usd, tokens=tokens, created_at=at, expires_at=expires)
            for p in locked.values()
        ]
    )
    return holds


def utilisation_of(period: BudgetPeriod) -> float:
    """Percent of the limit spent or held (the larger of USD and tokens)."""
    return percent_used(
        period.budget,
        spent_usd=period.spent_usd,
        reserved_usd=period.reserved_usd,
        spent_tokens=period.spent_tokens,
        reserved_tokens=period.reserved_tokens,
    )


def percent_used(budget: Budget, *, spent_usd: Decimal, reserved_usd: Decimal, spent_tokens: int, reserved_tokens: int) -> float:
    pct = 0.0
    if budget.limit_usd:
        pct = max(pct, float((spent_usd + reserved_usd) / budget.limit_usd * 100))
    elif budget.limit_usd is not None:  # a zero limit is fully used
        pct = 100.0
    if budget.limit_tokens:
        pct = max(pct, (spent_tokens + reserved_tokens) / budget.limit_tokens * 100)
    elif budget.limit_tokens is not None:
        pct = 100.0
    return pct


def _close(*, call_id: int, status: str, cost_usd: Decimal | None, tokens: int | None, include_expired: bool) -> int:
    """Move a call's holds to `status`, adjusting every period under its lock.

    Holds are read again after the period rows are locked: every change of a
    hold's state happens under those locks, so what is read then is stable,
    and each group of holds moves in one conditional statement."""
    states = [Reservation.Status.HELD] + ([Reservation.Status.EXPIRED] if include_expired else [])
    period_ids = set(Reservation.objects.filter(call_id=call_id, status__in=states).values_list("budget_period_id", flat=True))
    if not period_ids:
        return 0
    locked = _lock(period_ids)
    reservations = list(Reservation.objects.filter(call_id=call_id, status__in=states))
    now = timezone.now()
    fields = {"status": status, "closed_at": now}
    if status == Reservation.Status.SETTLED:
        fields.update(settled_usd=cost_usd, settled_tokens=tokens)
    changed = 0
    for was in states:
        group = [r for r in reservations if r.status == was]
        if not group:
            continue
        changed += Reservation.objects.filter(pk__in=[r.pk for r in group], status=was).update(**fields)
        # holds of one call all have the same amount (reserve() holds it on every budget)
        by_amount: dict[tuple[Decimal, int], list[int]] = {}
        for r in group:
            by_amount.setdefault((r.amount_usd, r.tokens), []).append(r.budget_period_id)
        for (amount, held_tokens), ids in by_amount.items():
            delta = {}
            if was == Reservation.Status.HELD:
                delta.update(reserved_usd=F("reserved_usd") - amount, reserved_tokens=F("reserved_tokens") - held_tokens)
            if status == Reservation.Status.SETTLED:
                delta.update(spent_usd=F("spent_usd") + cost_usd, spent_tokens=F("spent_tokens") + tokens)
            if delta:
                BudgetPeriod.objects.filter(pk__in=ids).update(**delta)
            for pid in ids:
                period = locked[pid]
                if was == Reservation.Status.HELD:
                    period.reserved_usd -= amount
                    period.reserved_tokens -= held_tokens
                if status == Reservation.Status.SETTLED:
                    period.spent_usd += cost_usd
                    period.spent_tokens += tokens
    if status == Reservation.Status.SETTLED:
        _raise_warnings(list(locked.values()))
    return changed


def settle(*, call_id: int, cost_usd: Decimal, tokens: int) -> int:
    """Charge the actual cost. A hold that expired before the call came back
    is charged too: the provider did the work, and the books must say so."""
    return _close(call_id=call_id, status=Reservation.Status.SETTLED, cost_usd=cost_usd, tokens=tokens, include_expired=True)


def release(*, call_id: int) -> int:
    return _close(call_id=call_id, status=Reservation.Status.RELEASED, cost_usd=None, tokens=None, include_expired=False)


def expire_stale_reservations(*, now: datetime | None = None, batch: int = 500) -> int:
    """Release holds past their expiry (their process died) and close the
    calls they belonged to as interrupted."""
    from conversations.services import INTERRUPTED, close_as_interrupted

    now = now or timezone.now()
    call_ids = list(
        Reservation.objects.filter(status=Reservation.Status.HELD, expires_at__lt=now)
        .values_list("call_id", flat=True)
        .distinct()[:batch]
    )
    expired = 0
    for call_id in call_ids:
        with transaction.atomic():
            expired += _close(call_id=call_id, status=Reservation.Status.EXPIRED, cost_usd=None, tokens=None, include_expired=False)
            close_as_interrupted(call_id=call_id, message=f"{INTERRUPTED} Its budget hold was released.")
    return expired


def _raise_warnings(periods: list[BudgetPeriod]) -> None:
    """Budget warnings from the locked rows as they now stand (no re-read)."""
    for period in periods:
        pct = utilisation_of(period)
        crossed = [t for t in (period.budget.warn_at or []) if pct >= t and t > period.warned_at_percent]
        if not crossed:
            continue
        level = int(max(crossed))
        if BudgetPeriod.objects.filter(pk=period.pk, warned_at_percent__lt=level).update(warned_at_percent=level):
            CostEvent.objects.create(
                kind=CostEvent.Kind.BUDGET_WARNING,
                application=period.budget.application,
                budget=period.budget,
                message=f"Budget '{period.budget.name}' reached {level}% ({pct:.1f}% used)",
                details={"period_start": period.period_start.isoformat(), "subject": period.subject, "utilisation": round(pct, 2)},
            )


def applies(budget: Budget, *, application_id: int, api_key_id: int, end_user: str, step: str) -> bool:
    """Whether a request of this application/key/end user/step counts against `budget`."""
    scope = budget.scope
    if scope == Budget.Scope.ORGANISATION:
        return True
    if scope == Budget.Scope.API_KEY:
        return budget.api_key_id == api_key_id
    if budget.application_id != application_id:
        return False
    if scope == Budget.Scope.APPLICATION:
        return True
    if scope == Budget.Scope.END_USER:
        return bool(end_user) and budget.end_user in ("", end_user)
    if scope == Budget.Scope.STEP:
        return bool(step) and budget.step == step
    return False


def applicable_budgets(*, candidates: list[Budget], application, api_key, end_user: str, step: str) -> list[Budget]:
    """The active budgets among `candidates` that a request counts against."""
    return [
        b
        for b in candidates
        if b.is_active and applies(b, application_id=application.pk, api_key_id=api_key.pk, end_user=end_user, step=step)
    ]


def recent_utilisation(
    *, budgets: list[Budget], end_user: str, max_age_s: float, at: datetime | None = None
) -> dict[int, float] | None:
    """Budget id → percent used (spent + held), from what this process saw of
    every period within max_age_s (budgets/readings.py); None if it has not
    seen them all that recently."""
    keys = _keys(budgets, end_user, at or timezone.now())
    seen = readings.fresh([(b.pk, subject, start) for b, subject, start, _ in keys], max_age_s)
    if seen is None:
        return None
    return {
        budget.pk: percent_used(budget, spent_usd=r.spent_usd, reserved_usd=r.reserved_usd,
                                spent_tokens=r.spent_tokens, reserved_tokens=r.reserved_tokens)
        for (budget, *_), r in zip(keys, seen, strict=True)
    }


def current_utilisation(*, budgets: list[Budget], end_user: str, at: datetime | None = None) -> dict[int, float]:
    """Budget id → percent used (spent + held) in the current period; one query, no locks."""
    at = at or timezone.now()
    keys = _keys(budgets, end_user, at)
    if not keys:
        return {}
    if connection.vendor == "postgresql":
        return _current_utilisation_sql(keys)
    existing = _existing_rows(keys)
    out = {}
    for budget, subject, start, _ in keys:
        row = existing.get((budget.pk, subject, start))
        if row is None:
            out[budget.pk] = 0.0 if (budget.limit_usd or budget.limit_tokens) else 100.0
        else:
            row.budget = budget
            out[budget.pk] = utilisation_of(row)
    return out


_UTILISATION_SQL = """
SELECT bp.budget_id, bp.spent_usd, bp.reserved_usd, bp.spent_tokens, bp.reserved_tokens, bp.id
  FROM budgets_budgetperiod bp
  JOIN jsonb_to_recordset(%s::jsonb) AS k(budget_id bigint, subject text, period_start timestamptz)
    ON bp.budget_id = k.budget_id AND bp.subject = k.subject AND bp.period_start = k.period_start
"""


def _current_utilisation_sql(keys) -> dict[int, float]:
    """The same read as a prepared statement: it runs before every request
    when a degradation ladder is set, and the ORM's compile cost dominated it."""
    from governance.db import fetch_prepared

    wanted = [{"budget_id": b.pk, "subject": subject, "period_start": start} for b, subject, start, _ in keys]
    rows = fetch_prepared(_UTILISATION_SQL, (orjson.dumps(wanted).decode(),))
    found = {r[0]: r for r in rows}
    readings.observe(
        [{"id": r[5], "budget_id": r[0], "spent_usd": r[1], "reserved_usd": r[2], "spent_tokens": r[3], "reserved_tokens": r[4]}
         for r in rows],
        keys={b.pk: (b.pk, subject, start) for b, subject, start, _ in keys},
    )
    out = {}
    for budget, *_ in keys:
        row = found.get(budget.pk)
        if row is None:
            out[budget.pk] = 0.0 if (budget.limit_usd or budget.limit_tokens) else 100.0
        else:
            out[budget.pk] = percent_used(budget, spent_usd=row[1], reserved_usd=row[2], spent_tokens=row[3], reserved_tokens=row[4])
    return out
