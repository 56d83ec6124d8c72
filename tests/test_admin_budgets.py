"""Budgets and resilience in the admin: budget status with a utilisation bar
and forecast from real accounting rows, validation messages from the models'
clean(), the degradation ladder / step policies / fallback routes inlines on
applications, key rate limits, read-only cost events, the circuit breakers
screen, and what each role may do."""

from __future__ import annotations

import datetime as dt
import html as html_lib
import re
from decimal import Decimal

import pytest
from django import forms
from django.contrib.auth.models import Group
from django.urls import reverse

from budgets import forecast
from budgets.admin import short_when
from budgets.models import Budget, BudgetPeriod, CostEvent, CostRegressionRule, DegradationRule, LanguageModel, StepPolicy
from budgets.services import reserve, settle
from governance.models import FallbackRoute, key_fingerprint
from governance.roles import AUDITOR, MANAGER, ON_CALL, SUPPORT_AGENT
from governance.services import create_api_key, revoke_api_key
from tests.budget_helpers import D, make_budget, make_call
from tests.factories import admin_url as url
from tests.factories import make_application, make_model, make_user

pytestmark = pytest.mark.django_db


# --- Fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def catalogue():
    _, price = make_model(name="gpt-4o-mini")
    make_model(name="gpt-4o", input_per_million="2.50", cached_input_per_million="1.25", output_per_million="10.00")
    LanguageModel.objects.create(name="gpt-unpriced")  # active, but no price: refused by the gateway
    return price


@pytest.fixture
def app(catalogue):
    return make_application(slug="support-bot")


def spend(budget: Budget, *, settled: str = "0", held: str = "0", tokens: int = 100, request_id: str = "r") -> None:
    """Real accounting through budgets.services: a settled call and/or a call still holding."""
    if Decimal(settled):
        call = make_call(budget.application, f"{request_id}-settled")
        reserve(call_id=call.pk, budgets=[budget], end_user="", amount_usd=D(settled), tokens=tokens, ttl_s=600)
        settle(call_id=call.pk, cost_usd=D(settled), tokens=tokens)
    if Decimal(held):
        call = make_call(budget.application, f"{request_id}-held")
        reserve(call_id=call.pk, budgets=[budget], end_user="", amount_usd=D(held), tokens=tokens, ttl_s=600)


def changelist_row(page: str, name: str) -> str:
    """The <tr> of the changelist row whose link text is `name`."""
    for row in re.findall(r"<tr>.*?</tr>", page, re.S):
        if re.search(rf">{re.escape(name)}</a>", row):
            return row
    raise AssertionError(f"no row for {name!r}")


def meter(fragment: str) -> dict:
    m = re.search(
        r'<div class="gov-meter gov-meter-(\w+)".*?data-percent="([\d.]+)" data-tone="(\w+)".*?'
        r'class="gov-meter-fill" style="width: ([\d.]+)%"',
        fragment,
        re.S,
    )
    assert m, fragment[:2000]
    assert m.group(1) == m.group(3)
    return {"tone": m.group(1), "percent": float(m.group(2)), "width": float(m.group(4))}


def text(fragment: str) -> str:
    return html_lib.unescape(re.sub(r"<[^>]+>", " ", fragment))


def form_data(client, page: str, **overrides) -> dict:
    """What a browser would post back from the change form at `page`,
    unchanged except for `overrides` (None removes a key); inline forms go
    back with their values and management forms."""
    response = client.get(page)
    assert response.status_code == 200, page
    data: dict = {}

    def put(form):
        for name, field in form.fields.items():
            key = form.add_prefix(name)
            value = form[name].value()
            if isinstance(field.widget, forms.CheckboxInput):
                if value:
                    data[key] = "on"
                continue
            if value is None:
                continue
            value = field.prepare_value(value)
            data[key] = "" if value is None else str(value)

    put(response.context["adminform"].form)
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        for name in formset.management_form.fields:
            data[f"{formset.prefix}-{name}"] = formset.management_form[name].value()
        for form in formset.initial_forms:
            put(form)
    for name, value in overrides.items():
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value
    return data


def add_inline_row(data: dict, prefix: str, **fields) -> dict:
    """Append one new row to the inline formset `prefix` of posted `data`."""
    i = int(data[f"{prefix}-TOTAL_FORMS"])
    data[f"{prefix}-TOTAL_FORMS"] = str(i + 1)
    for name, value in fields.items():
        data[f"{prefix}-{i}-{name}"] = value
    return data


def budget_form(**overrides) -> dict:
    data = {
        "name": "Support bot monthly",
        "is_active": "on",
        "scope": "application",
        "application": "",
        "api_key": "",
        "end_user": "",
        "step": "",
        "period": "month",
        "timezone": "UTC",
        "limit_usd": "100",
        "limit_tokens": "",
        "warn_at": "[50, 80, 95]",
        "hard_cap": "on",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


# --- Budget list and page: status, utilisation bar, forecast ---------------------------------


def test_budget_changelist_shows_status_and_utilisation_bars(client, manager, app):
    amber = make_budget(application=app, limit_usd=D("10"), warn_at=[50, 80, 95], name="Amber budget")
    spend(amber, settled="6.5", held="1.0", request_id="amber")
    red = make_budget(scope="organisation", limit_usd=D("2"), warn_at=[50, 80, 95], name="Red budget")
    spend(red, settled="1.94", request_id="red")
    green = make_budget(application=app, limit_tokens=1_000_000, warn_at=[50, 80, 95], name="Green budget")
    spend(green, settled="0.01", tokens=120_000, request_id="green")

    client.force_login(manager)
    response = client.get(url("budgets_budget_changelist"))
    assert response.status_code == 200
    page = response.content.decode()

    expectations = {"Amber budget": (amber, "warn"), "Red budget": (red, "bad"), "Green budget": (green, "ok")}
    for name, (budget, tone) in expectations.items():
        period = BudgetPeriod.objects.get(budget=budget)
        if budget.limit_usd is not None:
            expected = float((period.spent_usd + period.reserved_usd) / budget.limit_usd * 100)
        else:
            expected = (period.spent_tokens + period.reserved_tokens) / budget.limit_tokens * 100
        bar = meter(changelist_row(page, name))
        assert bar["percent"] == pytest.approx(expected, abs=0.05), name
        assert bar["width"] == pytest.approx(min(expected, 100), abs=0.05), name
        assert bar["tone"] == tone, name

    # The numbers behind the bars: 6.5 settled + 1.0 held of $10 is 75%.
    row = text(changelist_row(page, "Amber budget"))
    assert "$10.00" in row and "$6.50" in row and "$1.00" in row and "$2.50" in row
    assert "75.0%" in row
    assert "support-bot" in row and "Monthly" in row and "UTC" in row
    green_row = text(changelist_row(page, "Green budget"))
    assert "1M tokens" in green_row and "120k tokens" in green_row and "880k tokens" in green_row
    assert 'title="880,000 tokens"' in changelist_row(page, "Green budget")
    assert "organisation" in text(changelist_row(page, "Red budget"))


def test_budget_change_page_shows_status_periods_and_events(client, manager, app):
    budget = make_budget(application=app, limit_usd=D("10"), warn_at=[50, 80, 95], name="Support monthly")
    spend(budget, settled="8.2", held="0.3", request_id="x")
    period = BudgetPeriod.objects.get(budget=budget)
    event = CostEvent.objects.get(budget=budget)  # settling past 50% and 80% raised one warning (80%)

    client.force_login(manager)
    response = client.get(url("budgets_budget_change", budget.pk))
    assert response.status_code == 200
    page = response.content.decode()
    status_block = page.split('id="gov-recent-periods"')[0]
    bar = meter(status_block)
    assert bar["percent"] == pytest.approx(85.0) and bar["tone"] == "warn"
    visible = text(page)
    assert "$8.200000" not in visible and "$8.20" in visible and "$0.30" in visible and "$1.50" in visible
    start = period.period_start
    assert f"{start:%Y-%m-%d %H:%M}" in visible  # the current period
    # Recent periods table, with the same bar, and the event.
    periods = page.split('id="gov-recent-periods"')[1].split('id="gov-recent-events"')[0]
    assert meter(periods)["percent"] == pytest.approx(85.0)
    assert "80%" in text(periods)  # warned at
    events = page.split('id="gov-recent-events"')[1]
    assert event.message in html_lib.unescape(events)
    assert reverse("admin:budgets_costevent_change", args=[event.pk]) in events
    assert 'name="_save"' in page


def test_forecast_column_projects_from_settled_history(client, manager, app):
    now = dt.datetime.now(dt.timezone.utc)
    busy = make_budget(application=app, limit_usd=D("100"), name="Busy budget")
    for i, hours_ago in enumerate([20, 10, 2]):
        call = make_call(app, f"f{i}")
        reserve(call_id=call.pk, budgets=[busy], end_user="", amount_usd=D("3"), tokens=10, ttl_s=600)
        settle(call_id=call.pk, cost_usd=D("2"), tokens=10)
        busy.periods.get().reservations.filter(call=call).update(closed_at=now - dt.timedelta(hours=hours_ago))
    quiet = make_budget(application=app, limit_usd=D("100"), name="Quiet budget")

    client.force_login(manager)
    # The forecast moves with the clock: the page's, made between these two,
    # reads like one of them (a minute or a cent can turn in between).
    before = forecast.status(budget=busy)
    page = client.get(url("budgets_budget_changelist")).content.decode()
    after = forecast.status(budget=busy)
    assert after.projected_usd is not None and after.pace_usd_per_hour > 0
    row = text(changelist_row(page, "Busy budget"))
    assert any(f"${s.projected_usd.quantize(D('0.01')):,.2f} by period end" in row for s in (before, after)), row
    if after.cap_reached_at is not None:
        assert "cap reached ~" in row
        assert any(short_when(s.cap_reached_at, "UTC") in row for s in (before, after) if s.cap_reached_at), row
    else:
        assert "not this period" in row
    assert "no recent spend" in text(changelist_row(page, "Quiet budget"))
    assert forecast.status(budget=quiet).projected_usd is None


def test_exhausted_budget_is_red_and_says_limit_reached(client, manager, app):
    budget = make_budget(application=app, limit_usd=D("1"), name="Tiny budget", warn_at=[80])
    spend(budget, settled="1", request_id="t")
    client.force_login(manager)
    row = changelist_row(client.get(url("budgets_budget_changelist")).content.decode(), "Tiny budget")
    assert meter(row) == {"tone": "bad", "percent": 100.0, "width": 100.0}
    assert "limit reached" in text(row)


def test_budget_filters(client, auditor, app, catalogue):
    other = make_application(slug="sales-bot")
    make_budget(application=app, limit_usd=D("5"), name="App month")
    make_budget(application=other, limit_usd=D("5"), period="day", name="Other day")
    make_budget(scope="organisation", limit_usd=D("50"), name="Org", is_active=False)
    client.force_login(auditor)

    def names(params):
        response = client.get(url("budgets_budget_changelist"), params)
        assert response.status_code == 200
        return {b.name for b in response.context["cl"].result_list}

    assert names({"scope__exact": "organisation"}) == {"Org"}
    assert names({"period__exact": "day"}) == {"Other day"}
    assert names({"application__id__exact": app.pk}) == {"App month"}
    assert names({"is_active__exact": "0"}) == {"Org"}


# --- Budget validation: the model's messages, on the form, nothing saved ----------------------


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        ({"warn_at": "[80, 50]"}, "warn_at", "Warning thresholds must be in ascending order without repeats."),
        ({"warn_at": "[50, 120]"}, "warn_at", "Each warning threshold must be between 0 and 100 (exclusive)."),
        ({"limit_usd": "-5"}, "limit_usd", "Ensure this value is greater than or equal to 0."),
        ({"limit_usd": "", "limit_tokens": ""}, "limit_usd", "Set a limit in USD, in tokens, or both."),
        ({"scope": "organisation"}, "scope", "An organisation budget covers everything: leave application and key empty."),
        ({"application": ""}, "application", "A application budget needs an application."),
        ({"scope": "step"}, "step", "Name the step (the X-Step header value)."),
        ({"timezone": "Mars/Olympus"}, "timezone", "is not a time zone name"),
    ],
)
def test_invalid_budget_input_shows_the_models_message(client, manager, app, overrides, field, message):
    client.force_login(manager)
    overrides = {"application": str(app.pk), **overrides}
    response = client.post(url("budgets_budget_add"), budget_form(**overrides))
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert field in form.errors, form.errors
    assert message in " ".join(form.errors[field])
    assert html_lib.escape(message, quote=True).split("&#x27;")[0] in response.content.decode()
    assert not Budget.objects.exists()


def test_invalid_change_to_a_budget_saves_nothing(client, manager, app):
    budget = make_budget(application=app, limit_usd=D("10"), name="Keep me")
    before = budget.history.count()
    client.force_login(manager)
    data = form_data(client, url("budgets_budget_change", budget.pk), warn_at="[80, 50]", limit_usd="-1")
    response = client.post(url("budgets_budget_change", budget.pk), data)
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "ascending" in str(errors["warn_at"]) and "greater than or equal to 0" in str(errors["limit_usd"])
    budget.refresh_from_db()
    assert budget.warn_at == [50, 80, 95] and budget.limit_usd == D("10")
    assert budget.history.count() == before


# --- Who may do what with budgets -------------------------------------------------------------


def test_manager_adds_and_edits_a_budget_with_history(client, manager, app):
    client.force_login(manager)
    response = client.post(url("budgets_budget_add"), budget_form(application=str(app.pk), limit_usd="25"))
    assert response.status_code == 302, response.content.decode()[:3000]
    budget = Budget.objects.get()
    assert budget.history.get().history_user == manager

    data = form_data(client, url("budgets_budget_change", budget.pk), limit_usd="40", warn_at="[75, 90]")
    response = client.post(url("budgets_budget_change", budget.pk), data)
    assert response.status_code == 302, response.content.decode()[:3000]
    budget.refresh_from_db()
    assert budget.limit_usd == D("40") and budget.warn_at == [75, 90]
    latest = budget.history.latest()
    assert latest.history_type == "~" and latest.history_user == manager
    assert latest.prev_record.limit_usd == D("25")

    # Budgets are deactivated, not deleted.
    assert client.post(url("budgets_budget_delete", budget.pk), {"post": "yes"}).status_code == 403
    assert Budget.objects.filter(pk=budget.pk).exists()


def test_auditor_views_budgets_but_cannot_change_them(client, manager, auditor, app):
    budget = make_budget(application=app, limit_usd=D("10"), name="Read only")
    spend(budget, settled="2", request_id="a")
    client.force_login(manager)
    data = form_data(client, url("budgets_budget_change", budget.pk), limit_usd="999")

    client.force_login(auditor)
    assert client.get(url("budgets_budget_changelist")).status_code == 200
    response = client.get(url("budgets_budget_change", budget.pk))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'name="_save"' not in page and "gov-meter" in page and "Recent periods" in page
    assert client.get(url("budgets_budget_history", budget.pk)).status_code == 200
    assert client.post(url("budgets_budget_change", budget.pk), data).status_code == 403
    assert client.get(url("budgets_budget_add")).status_code == 403
    assert client.post(url("budgets_budget_delete", budget.pk), {"post": "yes"}).status_code == 403
    budget.refresh_from_db()
    assert budget.limit_usd == D("10")


def test_budget_with_accounting_cannot_be_deleted_even_by_a_superuser(client, superuser, app):
    budget = make_budget(application=app, limit_usd=D("10"))
    spend(budget, settled="1", request_id="d")
    client.force_login(superuser)
    assert client.post(url("budgets_budget_delete", budget.pk), {"post": "yes"}).status_code == 403
    assert Budget.objects.filter(pk=budget.pk).exists()


# --- Applications: fieldsets and the ladder / step / fallback inlines -------------------------


def test_application_page_groups_the_new_fields(client, manager, app):
    DegradationRule.objects.create(application=app, threshold_percent=90, refuse=True, refusal_mode="polite")
    DegradationRule.objects.create(application=app, threshold_percent=60, switch_to_model="gpt-4o-mini")
    client.force_login(manager)
    response = client.get(url("governance_application_change", app.pk))
    names = [fs.name for fs in response.context["adminform"]]
    assert names == [None, "Defaults", "Provider override", "Budgets & degradation", "Resilience", "Limits & cache",
                     "Failure replies"]
    page = response.content.decode()
    # Inlines sit under the fieldset they belong to.
    order = [page.index(s) for s in ["Budgets &amp; degradation", "Degradation ladder", "Step policies", "Resilience",
                                     "Fallback routes", "Limits &amp; cache", "Failure replies", "API keys"]]
    assert order == sorted(order)
    # The ladder lists rules by threshold.
    ladder = next(i for i in response.context["inline_admin_formsets"] if i.opts.model is DegradationRule)
    assert [f.instance.threshold_percent for f in ladder.formset.initial_forms] == [60, 90]
    # Unpriced models are offered but marked.
    assert "gpt-unpriced (no price: refused)" in page


def test_manager_builds_a_ladder_step_policy_and_fallback(client, manager, app):
    budget = make_budget(application=app, limit_usd=D("10"))
    client.force_login(manager)
    data = form_data(client, url("governance_application_change", app.pk), request_deadline_s="20", max_retries="3")
    add_inline_row(data, "degradation_rules", threshold_percent="80", budget=str(budget.pk), switch_to_model="gpt-4o-mini",
                   max_tokens_cap="300", keep_last_turns="", refusal_mode="error", position="0")
    add_inline_row(data, "degradation_rules", threshold_percent="100", budget="", switch_to_model="",
                   max_tokens_cap="", keep_last_turns="", refuse="on", refusal_mode="polite", position="0")
    add_inline_row(data, "step_policies", step="answer", max_input_tokens="4000", max_output_tokens="500",
                   oversize="truncate_oldest")
    add_inline_row(data, "fallbacks", position="1", model="gpt-4o", provider_base_url="", provider_api_key="sk-fallback-123")
    response = client.post(url("governance_application_change", app.pk), data)
    assert response.status_code == 302, response.content.decode()[:4000]

    app.refresh_from_db()
    assert app.request_deadline_s == D("20") and app.max_retries == 3
    rules = list(app.degradation_rules.order_by("threshold_percent"))
    assert [(r.threshold_percent, r.switch_to_model, r.refuse) for r in rules] == [
        (D("80"), "gpt-4o-mini", False), (D("100"), "", True)
    ]
    assert all(r.history.get().history_user == manager for r in rules)
    assert StepPolicy.objects.get(application=app).history.get().history_user == manager
    fallback = FallbackRoute.objects.get(application=app)
    assert fallback.model == "gpt-4o" and fallback.provider_api_key == "sk-fallback-123"
    assert fallback.history.get().history_user == manager
    assert fallback.history.get().provider_key_fingerprint == key_fingerprint("sk-fallback-123")

    # Deleting a rung is allowed (history keeps it), and names the manager.
    data = form_data(client, url("governance_application_change", app.pk))
    index = next(i for i in range(2) if data[f"degradation_rules-{i}-id"] == str(rules[1].pk))
    data[f"degradation_rules-{index}-DELETE"] = "on"
    response = client.post(url("governance_application_change", app.pk), data)
    assert response.status_code == 302, response.content.decode()[:4000]
    assert list(app.degradation_rules.all()) == [rules[0]]
    deleted = DegradationRule.history.filter(id=rules[1].pk).latest()
    assert deleted.history_type == "-" and deleted.history_user == manager
    fallback.refresh_from_db()
    assert fallback.provider_api_key == "sk-fallback-123"  # a blank key field keeps the stored key


def test_ladder_rule_to_an_unpriced_model_is_a_form_error_and_saves_nothing(client, manager, app):
    client.force_login(manager)
    before = app.history.count()
    data = form_data(client, url("governance_application_change", app.pk), name="Renamed meanwhile")
    add_inline_row(data, "degradation_rules", threshold_percent="80", budget="", switch_to_model="gpt-unpriced",
                   max_tokens_cap="", keep_last_turns="", refusal_mode="error", position="0")
    add_inline_row(data, "step_policies", step="answer", max_input_tokens="4000", max_output_tokens="",
                   oversize="refuse")
    response = client.post(url("governance_application_change", app.pk), data)
    assert response.status_code == 200
    ladder = next(i for i in response.context["inline_admin_formsets"] if i.opts.model is DegradationRule)
    errors = ladder.formset.errors[0]
    assert "'gpt-unpriced' has no price in force; calls to it would be refused." in errors["switch_to_model"]
    page = html_lib.unescape(response.content.decode())
    assert "'gpt-unpriced' has no price in force; calls to it would be refused." in page
    assert not DegradationRule.objects.exists() and not StepPolicy.objects.exists()
    app.refresh_from_db()
    assert app.name != "Renamed meanwhile" and app.history.count() == before


def test_ladder_rule_that_does_nothing_is_a_form_error(client, manager, app):
    client.force_login(manager)
    data = form_data(client, url("governance_application_change", app.pk))
    add_inline_row(data, "degradation_rules", threshold_percent="50", budget="", switch_to_model="",
                   max_tokens_cap="", keep_last_turns="", refusal_mode="error", position="0")
    response = client.post(url("governance_application_change", app.pk), data)
    assert response.status_code == 200
    assert "A rule must do something" in html_lib.unescape(response.content.decode())
    assert not DegradationRule.objects.exists()


def test_fallback_to_a_model_no_longer_in_the_catalogue_is_a_form_error(client, manager, app):
    fallback = FallbackRoute.objects.create(application=app, position=1, model="gpt-4o")
    LanguageModel.objects.filter(name="gpt-4o").update(is_active=False)  # retired after the route was set up
    client.force_login(manager)
    data = form_data(client, url("governance_application_change", app.pk), name="Renamed meanwhile")
    response = client.post(url("governance_application_change", app.pk), data)
    assert response.status_code == 200
    page = html_lib.unescape(response.content.decode())
    assert "'gpt-4o' is not an active model in the catalogue." in page
    assert "gpt-4o (not an active catalogued model)" in page
    app.refresh_from_db()
    assert app.name != "Renamed meanwhile"
    fallback.refresh_from_db()
    assert fallback.model == "gpt-4o"

    # An unknown name typed into the request is refused too, and nothing is created.
    LanguageModel.objects.filter(name="gpt-4o").update(is_active=True)
    data = form_data(client, url("governance_application_change", app.pk))
    add_inline_row(data, "fallbacks", position="2", model="gpt-9", provider_base_url="", provider_api_key="")
    response = client.post(url("governance_application_change", app.pk), data)
    assert response.status_code == 200
    assert FallbackRoute.objects.count() == 1


def test_fallback_provider_key_is_never_displayed(client, superuser, manager, auditor, app):
    secret = "sk-fallback-never-shown-987654321"
    fallback = FallbackRoute.objects.create(application=app, position=1, model="gpt-4o", provider_api_key=secret)
    for user in (superuser, manager, auditor):
        client.force_login(user)
        for page in [
            url("governance_application_change", app.pk),
            url("governance_application_changelist"),
            url("configuration_changes"),
        ]:
            response = client.get(page)
            assert response.status_code == 200, page
            assert secret not in response.content.decode(), (user.username, page)
        assert "(never displayed)" in client.get(url("governance_application_change", app.pk)).content.decode()

    # Saving the application without typing a key keeps it; a new one replaces it; the box removes it.
    client.force_login(manager)
    page = url("governance_application_change", app.pk)
    assert client.post(page, form_data(client, page, name="Support bot v2")).status_code == 302
    fallback.refresh_from_db()
    assert fallback.provider_api_key == secret
    assert client.post(page, form_data(client, page, **{"fallbacks-0-provider_api_key": "sk-other"})).status_code == 302
    fallback.refresh_from_db()
    assert fallback.provider_api_key == "sk-other"
    assert client.post(page, form_data(client, page, **{"fallbacks-0-clear_provider_api_key": "on"})).status_code == 302
    fallback.refresh_from_db()
    assert fallback.provider_api_key == ""
    assert all("sk-" not in str(h.__dict__.get("provider_api_key", "")) for h in fallback.history.all())


def test_auditor_cannot_change_the_ladder(client, manager, auditor, app):
    rule = DegradationRule.objects.create(application=app, threshold_percent=80, max_tokens_cap=200)
    client.force_login(manager)
    data = form_data(client, url("governance_application_change", app.pk), **{"degradation_rules-0-max_tokens_cap": "5"})
    client.force_login(auditor)
    response = client.get(url("governance_application_change", app.pk))
    assert response.status_code == 200 and "Degradation ladder" in response.content.decode()
    assert client.post(url("governance_application_change", app.pk), data).status_code == 403
    rule.refresh_from_db()
    assert rule.max_tokens_cap == 200


# --- API key rate limits ------------------------------------------------------------------------


def test_manager_sets_key_rate_limits_and_nothing_else(client, manager, auditor, app):
    key = create_api_key(application=app, name="widget").api_key
    page = url("governance_apikey_change", key.pk)
    client.force_login(manager)
    html = client.get(page).content.decode()
    assert 'name="requests_per_minute"' in html and 'name="_save"' in html and 'name="name"' not in html

    response = client.post(page, {"requests_per_minute": "60", "tokens_per_minute": "20000", "_save": "Save"})
    assert response.status_code == 302, response.content.decode()[:3000]
    key.refresh_from_db()
    assert (key.requests_per_minute, key.tokens_per_minute, key.name) == (60, 20000, "widget")
    latest = key.history.latest()
    assert latest.history_user == manager and latest.history_type == "~"
    assert "60 req/min · 20,000 tokens/min" in client.get(url("governance_apikey_changelist")).content.decode()

    # Anything but the limits is refused, not silently ignored.
    assert client.post(page, {"requests_per_minute": "1", "name": "renamed"}).status_code == 403
    key.refresh_from_db()
    assert key.requests_per_minute == 60 and key.name == "widget"

    client.force_login(auditor)
    assert client.post(page, {"requests_per_minute": "1"}).status_code == 403

    client.force_login(manager)
    revoke_api_key(api_key=key, actor=manager)
    assert 'name="requests_per_minute"' not in client.get(page).content.decode()
    assert client.post(page, {"requests_per_minute": "1"}).status_code == 403
    key.refresh_from_db()
    assert key.requests_per_minute == 60 and key.revoked_at is not None


# --- Cost regression rules and cost events --------------------------------------------------------


def test_manager_adds_a_cost_regression_rule_with_history(client, manager, app):
    client.force_login(manager)
    response = client.post(
        url("budgets_costregressionrule_add"),
        {"application": app.pk, "metric": "per_call", "max_ratio": "1.8", "recent_hours": "24", "baseline_days": "7",
         "min_samples": "20", "is_active": "on"},
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    rule = CostRegressionRule.objects.get()
    assert rule.history.get().history_user == manager
    assert "× 1.80" in client.get(url("budgets_costregressionrule_changelist")).content.decode()
    bad = client.post(url("budgets_costregressionrule_add"), {"application": app.pk, "metric": "per_call",
                      "max_ratio": "0.5", "recent_hours": "24", "baseline_days": "7", "min_samples": "20"})
    assert bad.status_code == 200 and "max_ratio" in bad.context["adminform"].form.errors
    assert client.post(url("budgets_costregressionrule_delete", rule.pk), {"post": "yes"}).status_code == 403


@pytest.fixture
def events(app):
    budget = make_budget(application=app, limit_usd=D("10"), name="Support monthly")
    spend(budget, settled="6", request_id="e")  # raises a 50% warning
    rule = CostRegressionRule.objects.create(application=app)
    regression = CostEvent.objects.create(kind="cost_regression", application=app, rule=rule,
                                          message="Cost per call rose ×2.10 over the baseline", details={"ratio": "2.10"})
    return CostEvent.objects.get(kind="budget_warning"), regression


def test_cost_events_list_and_page(client, auditor, events):
    warning, regression = events
    client.force_login(auditor)
    response = client.get(url("budgets_costevent_changelist"))
    assert response.status_code == 200
    page = response.content.decode()
    assert "gov-badge gov-warn" in page and "gov-badge gov-bad" in page
    assert warning.message in html_lib.unescape(page) and "Cost per call rose ×2.10" in page
    assert reverse("admin:budgets_budget_change", args=[warning.budget_id]) in page
    ids = lambda params: {e.pk for e in client.get(url("budgets_costevent_changelist"), params).context["cl"].result_list}
    assert ids({"kind__exact": "cost_regression"}) == {regression.pk}
    assert ids({"budget__id__exact": warning.budget_id}) == {warning.pk}  # "All events of this budget"
    assert ids({"rule__id__exact": regression.rule_id}) == {regression.pk}
    assert ids({"application__id__exact": warning.application_id}) == {warning.pk, regression.pk}
    today = warning.created_at
    assert ids({"created_at__year": today.year, "created_at__month": today.month, "created_at__day": today.day}) == {
        warning.pk, regression.pk}
    detail = client.get(url("budgets_costevent_change", regression.pk)).content.decode()
    assert '"ratio": "2.10"' in html_lib.unescape(detail) and 'name="_save"' not in detail


def test_cost_events_cannot_be_changed_or_deleted_even_by_a_superuser(client, superuser, events):
    warning, _ = events
    client.force_login(superuser)
    assert client.post(url("budgets_costevent_change", warning.pk), {"message": "edited"}).status_code == 403
    assert client.post(url("budgets_costevent_delete", warning.pk), {"post": "yes"}).status_code == 403
    assert client.get(url("budgets_costevent_add")).status_code == 403
    client.post(url("budgets_costevent_changelist"), {"action": "delete_selected", "_selected_action": [warning.pk],
                                                      "post": "yes"})
    warning.refresh_from_db()
    assert warning.message.startswith("Budget 'Support monthly' reached")


# --- Circuit breakers screen --------------------------------------------------------------------


@pytest.fixture
def breakers(settings):
    from django.core.cache import caches

    from conversations.gateway import breaker, shared

    caches["default"].clear()
    shared._local.clear()
    settings.GATEWAY = {**settings.GATEWAY, "BREAKER": {**settings.GATEWAY["BREAKER"], "MIN_CALLS": 3}}
    failing = breaker.key_for("https://api.example.test/v1", "gpt-4o")
    for _ in range(3):
        breaker.record(failing, False)
    healed = breaker.key_for("https://api.example.test/v1", "gpt-4o-mini")
    for _ in range(3):
        breaker.record(healed, False)
    caches["default"].delete(f"cb:{healed}:open")  # closed again, still registered
    yield failing, healed
    caches["default"].clear()
    shared._local.clear()


def test_breakers_page_lists_an_open_breaker(client, breakers):
    failing, healed = breakers
    oncall = make_user(username="otto", role=ON_CALL)
    client.force_login(oncall)
    assert url("circuit_breakers") in client.get(url("index")).content.decode()
    response = client.get(url("circuit_breakers"))
    assert response.status_code == 200
    rows = {r.key: r for r in response.context["breakers"]}
    assert rows[failing].state == "open" and rows[failing].calls == 3 and rows[failing].failures == 3
    assert rows[healed].state == "closed"
    assert [r.key for r in response.context["breakers"]][0] == failing  # open first
    page = response.content.decode()
    row = re.search(rf'<tr class="gov-breaker gov-breaker-open" data-key="{re.escape(failing)}".*?</tr>', page, re.S).group(0)
    assert "gov-badge gov-bad" in row and ">open<" in row and "gpt-4o" in row and "(100%)" in row
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", row) and "(in " in row
    # on-call may read the call log, so the model links there
    assert reverse("admin:conversations_providercall_changelist") + "?model_used=gpt-4o" in row


def test_breakers_page_is_refused_without_permission(client, breakers):
    nobody = make_user(username="norole")
    client.force_login(nobody)
    assert client.get(url("circuit_breakers")).status_code == 403
    assert url("circuit_breakers") not in client.get(url("index")).content.decode()
    agent = make_user(username="sam", role=SUPPORT_AGENT)  # reads calls: may see breakers
    client.force_login(agent)
    assert client.get(url("circuit_breakers")).status_code == 200


def test_breakers_page_with_no_breakers(client, superuser, settings):
    from django.core.cache import caches

    caches["default"].clear()
    client.force_login(superuser)
    response = client.get(url("circuit_breakers"))
    assert response.status_code == 200 and "every provider is answering" in response.content.decode()


# --- Roles --------------------------------------------------------------------------------------


def perms_of(role: str) -> set[str]:
    group = Group.objects.get(name=role)
    return {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.select_related("content_type")}


def test_roles_cover_budgets_and_resilience():
    manager = perms_of(MANAGER)
    for model in ["budget", "degradationrule", "steppolicy", "costregressionrule"]:
        assert {f"budgets.add_{model}", f"budgets.change_{model}", f"budgets.view_{model}"} <= manager
    assert {"governance.add_fallbackroute", "governance.change_fallbackroute", "governance.view_fallbackroute"} <= manager
    assert {"budgets.view_budgetperiod", "budgets.view_reservation", "budgets.view_costevent"} <= manager
    deletable = {p for p in manager if p.split(".")[1].startswith("delete_")}
    assert deletable == {"budgets.delete_degradationrule", "budgets.delete_steppolicy", "governance.delete_fallbackroute"}
    assert not any(p.endswith(("_costevent", "_budgetperiod", "_reservation")) and ".view_" not in p for p in manager)

    auditor = perms_of(AUDITOR)
    for perm in ["budgets.view_budget", "budgets.view_historicalbudget", "budgets.view_degradationrule",
                 "budgets.view_historicaldegradationrule", "budgets.view_steppolicy", "budgets.view_historicalsteppolicy",
                 "budgets.view_costregressionrule", "budgets.view_historicalcostregressionrule",
                 "budgets.view_budgetperiod", "budgets.view_reservation", "budgets.view_costevent",
                 "governance.view_fallbackroute", "governance.view_historicalfallbackroute"]:
        assert perm in auditor, perm
    assert not any(p.split(".")[1].startswith(("add_", "change_", "delete_")) for p in auditor)

    assert perms_of(ON_CALL) == {"conversations.view_providercall", "budgets.view_costevent"}


def test_on_call_sees_cost_events_but_not_budgets(client, events):
    client.force_login(make_user(username="otto", role=ON_CALL))
    assert client.get(url("budgets_costevent_changelist")).status_code == 200
    assert client.get(url("budgets_budget_changelist")).status_code == 403
