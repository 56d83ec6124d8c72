"""Reservation accounting, period rollover, expiry, warnings, forecasts and
cost regression, against the real database."""

import datetime as dt
import threading
from decimal import Decimal

import pytest
from django.db import connection
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from budgets import forecast, regression
from budgets.models import BudgetPeriod, CostEvent, CostRegressionRule, Reservation
from budgets.periods import period_bounds
from budgets.services import BudgetExceeded, expire_stale_reservations, release, reserve, settle
from conversations.models import ProviderCall
from governance.models import Application
from tests.budget_helpers import UTC, D, make_budget, make_call


@pytest.fixture
def app(db):
    return Application.objects.create(slug="b", name="B", default_model="gpt-4o-mini")


def test_reserve_is_all_or_nothing(app):
    roomy = make_budget(application=app, limit_usd=D("10"), name="roomy")
    tight = make_budget(scope="organisation", limit_usd=D("1"), name="tight")
    call = make_call(app)
    with pytest.raises(BudgetExceeded) as info:
        from django.db import transaction

        with transaction.atomic():
            reserve(call_id=call.pk, budgets=[roomy, tight], end_user="", amount_usd=D("2"), tokens=10, ttl_s=60)
    assert "tight" in info.value.message and "$1.00" in info.value.message
    assert not Reservation.objects.exists()
    assert all(p.reserved_usd == 0 for p in BudgetPeriod.objects.all())


def test_settle_moves_hold_to_spend_and_release_frees_it(app):
    budget = make_budget(application=app, limit_usd=D("1"), limit_tokens=1000)
    a, b = make_call(app, "a"), make_call(app, "b")
    reserve(call_id=a.pk, budgets=[budget], end_user="", amount_usd=D("0.4"), tokens=400, ttl_s=60)
    reserve(call_id=b.pk, budgets=[budget], end_user="", amount_usd=D("0.4"), tokens=400, ttl_s=60)
    with pytest.raises(BudgetExceeded):
        reserve(call_id=make_call(app, "c").pk, budgets=[budget], end_user="", amount_usd=D("0.3"), tokens=10, ttl_s=60)
    settle(call_id=a.pk, cost_usd=D("0.123456789"), tokens=150)
    release(call_id=b.pk)
    period = BudgetPeriod.objects.get()
    assert (period.spent_usd, period.reserved_usd, period.spent_tokens, period.reserved_tokens) == (D("0.123456789"), 0, 150, 0)
    # settling or releasing again changes nothing
    settle(call_id=a.pk, cost_usd=D("5"), tokens=5)
    release(call_id=b.pk)
    period.refresh_from_db()
    assert period.spent_usd == D("0.123456789") and period.reserved_usd == 0


def test_token_limit_alone(app):
    budget = make_budget(application=app, limit_tokens=100)
    reserve(call_id=make_call(app).pk, budgets=[budget], end_user="", amount_usd=D("0"), tokens=100, ttl_s=60)
    with pytest.raises(BudgetExceeded) as info:
        reserve(call_id=make_call(app, "x").pk, budgets=[budget], end_user="", amount_usd=D("0"), tokens=1, ttl_s=60)
    assert info.value.unit == "tokens" and "tokens" in info.value.message


def test_soft_budget_only_warns(app):
    budget = make_budget(application=app, limit_usd=D("1"), hard_cap=False, warn_at=[50, 80])
    call = make_call(app)
    reserve(call_id=call.pk, budgets=[budget], end_user="", amount_usd=D("5"), tokens=1, ttl_s=60)
    settle(call_id=call.pk, cost_usd=D("0.85"), tokens=1)
    events = list(CostEvent.objects.filter(budget=budget))
    assert len(events) == 1 and "80%" in events[0].message, "one event for the highest threshold crossed"
    settle_again = make_call(app, "y")
    reserve(call_id=settle_again.pk, budgets=[budget], end_user="", amount_usd=D("0.01"), tokens=1, ttl_s=60)
    settle(call_id=settle_again.pk, cost_usd=D("0.01"), tokens=1)
    assert CostEvent.objects.filter(budget=budget).count() == 1, "a threshold warns once per period"


def test_per_end_user_budget_keeps_users_apart(app):
    budget = make_budget(application=app, scope="end_user", limit_usd=D("1"))
    reserve(call_id=make_call(app, "1").pk, budgets=[budget], end_user="alice", amount_usd=D("1"), tokens=1, ttl_s=60)
    with pytest.raises(BudgetExceeded):
        reserve(call_id=make_call(app, "2").pk, budgets=[budget], end_user="alice", amount_usd=D("0.01"), tokens=1, ttl_s=60)
    reserve(call_id=make_call(app, "3").pk, budgets=[budget], end_user="bob", amount_usd=D("1"), tokens=1, ttl_s=60)
    assert set(BudgetPeriod.objects.values_list("subject", flat=True)) == {"alice", "bob"}


def test_expired_hold_is_released_and_call_interrupted(app):
    budget = make_budget(application=app, limit_usd=D("1"))
    call = make_call(app)
    reserve(call_id=call.pk, budgets=[budget], end_user="", amount_usd=D("0.5"), tokens=10, ttl_s=1)
    assert expire_stale_reservations() == 0, "not expired yet"
    later = dt.datetime.now(UTC) + dt.timedelta(seconds=5)
    assert expire_stale_reservations(now=later) == 1
    period = BudgetPeriod.objects.get()
    assert period.reserved_usd == 0 and period.spent_usd == 0
    call.refresh_from_db()
    assert call.status == "interrupted" and call.error_code == "interrupted"
    # the provider answered after all: the work is charged
    settle(call_id=call.pk, cost_usd=D("0.2"), tokens=5)
    period.refresh_from_db()
    assert period.spent_usd == D("0.2") and period.reserved_usd == 0


# --- periods -------------------------------------------------------------------

def test_rollover_at_midnight_in_the_budgets_time_zone(app):
    budget = make_budget(application=app, limit_usd=D("1"), period="day", tz="America/New_York")
    before = dt.datetime(2026, 3, 10, 3, 59, 59, tzinfo=UTC)  # 23:59:59 in New York (EDT, UTC-4, since 8 March)
    after = dt.datetime(2026, 3, 10, 4, 0, 1, tzinfo=UTC)  # 00:00:01 next day in New York
    reserve(call_id=make_call(app, "1").pk, budgets=[budget], end_user="", amount_usd=D("1"), tokens=1, ttl_s=60, at=before)
    reserve(call_id=make_call(app, "2").pk, budgets=[budget], end_user="", amount_usd=D("1"), tokens=1, ttl_s=60, at=after)
    periods = list(BudgetPeriod.objects.order_by("period_start"))
    assert [p.period_start for p in periods] == [
        dt.datetime(2026, 3, 9, 4, 0, tzinfo=UTC),
        dt.datetime(2026, 3, 10, 4, 0, tzinfo=UTC),
    ]
    assert all(p.reserved_usd == D("1") for p in periods), "the new day started from zero"


@pytest.mark.parametrize(
    "period,tz,at,start,end",
    [
        ("day", "Europe/Paris", "2026-03-29T12:00:00+00:00", "2026-03-28T23:00:00+00:00", "2026-03-29T22:00:00+00:00"),  # 23-hour day
        ("day", "Europe/Paris", "2026-10-25T12:00:00+00:00", "2026-10-24T22:00:00+00:00", "2026-10-25T23:00:00+00:00"),  # 25-hour day
        ("week", "UTC", "2026-12-03T10:00:00+00:00", "2026-11-30T00:00:00+00:00", "2026-12-07T00:00:00+00:00"),
        ("month", "Asia/Tokyo", "2026-01-31T16:00:00+00:00", "2026-01-31T15:00:00+00:00", "2026-02-28T15:00:00+00:00"),
        ("month", "UTC", "2026-12-31T23:59:59+00:00", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ],
)
def test_period_bounds(period, tz, at, start, end):
    got = period_bounds(period=period, tz_name=tz, at=dt.datetime.fromisoformat(at))
    assert got == (dt.datetime.fromisoformat(start), dt.datetime.fromisoformat(end))


@pytest.mark.skipif(connection.vendor != "postgresql", reason="needs concurrent writers")
@pytest.mark.postgres
def test_many_first_requests_of_a_period_share_one_row_and_respect_the_cap(transactional_db):
    app = Application.objects.create(slug="c", name="C", default_model="gpt-4o-mini")
    budget = make_budget(application=app, limit_usd=D("1.00"), period="day")
    calls = [make_call(app, f"t{i}").pk for i in range(40)]
    results = []
    barrier = threading.Barrier(len(calls))

    def worker(call_id):
        from django.db import connection as conn, transaction

        barrier.wait()
        try:
            with transaction.atomic():
                reserve(call_id=call_id, budgets=[budget], end_user="", amount_usd=D("0.10"), tokens=1, ttl_s=60)
            results.append("ok")
        except BudgetExceeded:
            results.append("refused")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 10 and results.count("refused") == 30
    period = BudgetPeriod.objects.get(budget=budget)
    assert period.reserved_usd == D("1.00")


# --- hypothesis: any interleaving of reserve / settle / fail / expire -------------

class ReservationMachine(RuleBasedStateMachine):
    @initialize(limit=st.integers(min_value=1, max_value=50))
    def setup(self, limit):
        self.app = Application.objects.create(slug=f"h{Application.objects.count()}", name="H", default_model="m")
        self.limit = D(limit) / 10
        self.budget = make_budget(application=self.app, limit_usd=self.limit, limit_tokens=limit * 20)
        self.open: dict[int, tuple[D, int]] = {}
        self.spent = D(0)
        self.spent_tokens = 0
        self.n = 0

    @rule(amount=st.integers(min_value=0, max_value=30), tokens=st.integers(min_value=0, max_value=300))
    def reserve(self, amount, tokens):
        self.n += 1
        call = make_call(self.app, f"h{self.n}")
        amount = D(amount) / 10
        fits = (
            self.spent + sum(a for a, _ in self.open.values()) + amount <= self.limit
            and self.spent_tokens + sum(t for _, t in self.open.values()) + tokens <= self.budget.limit_tokens
        )
        try:
            from django.db import transaction

            with transaction.atomic():
                reserve(call_id=call.pk, budgets=[self.budget], end_user="", amount_usd=amount, tokens=tokens, ttl_s=3600)
            assert fits, "admitted a hold that passes the cap"
            self.open[call.pk] = (amount, tokens)
        except BudgetExceeded:
            assert not fits, "refused a hold that fits"

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def settle(self, data):
        call_id = data.draw(st.sampled_from(sorted(self.open)))
        amount, tokens = self.open.pop(call_id)
        actual = data.draw(st.integers(min_value=0, max_value=int(amount * 10))) * D("0.1")
        used = data.draw(st.integers(min_value=0, max_value=tokens))
        settle(call_id=call_id, cost_usd=actual, tokens=used)
        self.spent += actual
        self.spent_tokens += used

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def fail(self, data):
        call_id = data.draw(st.sampled_from(sorted(self.open)))
        self.open.pop(call_id)
        release(call_id=call_id)

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def expire(self, data):
        call_id = data.draw(st.sampled_from(sorted(self.open)))
        self.open.pop(call_id)
        Reservation.objects.filter(call_id=call_id).update(expires_at=dt.datetime(2000, 1, 1, tzinfo=UTC))
        expire_stale_reservations()
        assert ProviderCall.objects.get(pk=call_id).status == "interrupted"

    @invariant()
    def books_balance(self):
        if not hasattr(self, "budget"):
            return
        period = BudgetPeriod.objects.filter(budget=self.budget).first()
        if period is None:
            return
        assert period.spent_usd == self.spent
        assert period.reserved_usd == sum((a for a, _ in self.open.values()), D(0))
        assert period.reserved_tokens == sum(t for _, t in self.open.values())
        assert period.spent_usd + period.reserved_usd <= self.limit
        held = Reservation.objects.filter(budget_period=period, status="held")
        assert sorted(held.values_list("call_id", flat=True)) == sorted(self.open)


def test_any_interleaving_keeps_the_books(db):
    machine = ReservationMachine.TestCase
    machine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck))
    machine().runTest()


# --- forecast and regression ------------------------------------------------------

def test_forecast_from_settled_history(app):
    budget = make_budget(application=app, limit_usd=D("100"), period="month")
    now = dt.datetime(2026, 12, 11, 12, 0, tzinfo=UTC)
    # $1 settled every 2 hours over the last 2 days → $0.50 / hour
    for i in range(24):
        call = make_call(app, f"f{i}")
        at = now - dt.timedelta(hours=2 * i + 1)
        reserve(call_id=call.pk, budgets=[budget], end_user="", amount_usd=D("1"), tokens=1, ttl_s=60, at=at)
        settle(call_id=call.pk, cost_usd=D("1"), tokens=1)
        Reservation.objects.filter(call_id=call.pk).update(closed_at=at)
    s = forecast.status(budget=budget, now=now)
    assert s.spent_usd == D("24") and s.remaining_usd == D("76")
    assert s.utilisation_percent == pytest.approx(24.0)
    assert s.pace_usd_per_hour == pytest.approx(D(24) / D(47), rel=D("0.001"))
    hours_left = (dt.datetime(2027, 1, 1, tzinfo=UTC) - now).total_seconds() / 3600
    assert float(s.projected_usd) == pytest.approx(24 + float(s.pace_usd_per_hour) * hours_left)
    assert s.cap_reached_at == pytest.approx(now + dt.timedelta(hours=float(D(76) / s.pace_usd_per_hour)), abs=dt.timedelta(seconds=1))


def test_forecast_without_history_says_nothing(app):
    s = forecast.status(budget=make_budget(application=app, limit_usd=D("5")))
    assert s.pace_usd_per_hour is None and s.projected_usd is None and s.cap_reached_at is None
    assert s.remaining_usd == D("5") and s.utilisation_percent == 0


def _calls(app, n, cost, hours_ago):
    now = dt.datetime.now(UTC)
    for i in range(n):
        ProviderCall.objects.create(
            request_id=f"rg{hours_ago}-{i}", application=app, status="succeeded", outcome="answered",
            cost_usd=cost, created_at=now - dt.timedelta(hours=hours_ago, minutes=i),
        )


def test_cost_regression_event(app):
    rule = CostRegressionRule.objects.create(application=app, recent_hours=24, baseline_days=7, max_ratio=D("1.5"), min_samples=5)
    _calls(app, 10, D("0.001"), hours_ago=48)
    _calls(app, 10, D("0.0014"), hours_ago=2)
    assert regression.detect(rule=rule) is None, "×1.4 is within the ratio"
    _calls(app, 10, D("0.004"), hours_ago=1)
    event = regression.detect(rule=rule)
    assert event is not None and event.kind == "cost_regression"
    assert D(event.details["ratio"]) == D("2.7")
    assert regression.detect(rule=rule) is None, "raised once per window"


def test_cost_regression_needs_enough_samples(app):
    rule = CostRegressionRule.objects.create(application=app, min_samples=20)
    _calls(app, 3, D("0.001"), hours_ago=48)
    _calls(app, 3, D("1"), hours_ago=1)
    assert regression.detect(rule=rule) is None
