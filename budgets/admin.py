"""Admin for the model catalogue and its price table, budgets (with their
status, utilisation bar and forecast), cost regression rules, and the
read-only cost events. Every change keeps a history record with the acting
user (simple_history: HistoryRequestMiddleware supplies the user for admin
saves, inline ones included).

The degradation ladder and step policies are edited as inlines of their
application (governance/admin.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django import forms
from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils import timezone
from django.utils.safestring import mark_safe

from budgets import forecast
from budgets.models import Budget, BudgetPeriod, CostEvent, CostRegressionRule, LanguageModel, ModelPrice
from budgets.selectors import price_in_force
from budgets.services import utilisation_of
from governance.admin import (
    HistoryAdmin,
    ReadOnlyAdminMixin,
    RequestAwareAdmin,
    admin_link,
    count,
    tone_badge,
    usd,
    when,
)


def _per_million(value) -> str:
    return "—" if value is None else usd(value, 6)


class ModelPriceInline(admin.TabularInline):
    model = ModelPrice
    fields = ["effective_from", "input_per_million", "cached_input_per_million", "output_per_million", "note"]
    extra = 0
    show_change_link = True
    ordering = ["-effective_from"]
    verbose_name_plural = "Prices (newest first; add a version with a later effective date to change a price)"

    def has_delete_permission(self, request, obj=None):
        return False  # price versions are referenced by calls; add a new version instead


@admin.register(LanguageModel)
class LanguageModelAdmin(HistoryAdmin):
    list_display = ["name", "upstream_name", "encoding", "context_window", "is_active", "current_price"]
    list_filter = ["is_active", "encoding"]
    search_fields = ["name", "upstream_name"]
    list_per_page = 50
    readonly_fields = ["created_at", "current_price"]
    fields = ["name", "upstream_name", "encoding", "context_window", "is_active", "current_price", "created_at"]
    inlines = [ModelPriceInline]

    @admin.display(description="Price in force ($/1M in · cached · out)")
    def current_price(self, obj: LanguageModel) -> str:
        if obj is None or obj.pk is None:
            return "—"
        price = price_in_force(model=obj)
        if price is None:
            return mark_safe('<span class="gov-badge gov-bad">no price: refused</span>')
        return f"{usd(price.input_per_million)} · {usd(price.cached_rate)} · {usd(price.output_per_million)}"

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.prices.exists():
            return False  # protected by its prices, and prices by the calls billed at them
        return super().has_delete_permission(request, obj)


@admin.register(ModelPrice)
class ModelPriceAdmin(HistoryAdmin):
    list_display_base = [
        "model",
        "effective_from",
        "input_price",
        "cached_price",
        "output_price",
    ]
    list_display_links = ["model", "effective_from"]
    list_filter = ["model"]
    list_select_related = ["model"]
    date_hierarchy = "effective_from"
    search_fields = ["model__name", "note"]
    list_per_page = 50
    readonly_fields = ["created_at", "in_force_now", "calls_billed"]
    fields = [
        "model",
        "effective_from",
        "input_per_million",
        "cached_input_per_million",
        "output_per_million",
        "note",
        "in_force_now",
        "calls_billed",
        "created_at",
    ]

    def get_list_display(self, request):
        # "In force now" comes from budgets.selectors.price_in_force, once per
        # model shown on the page rather than once per row.
        in_force_by_model: dict[int, int | None] = {}

        @admin.display(description="In force now", boolean=True)
        def in_force(obj: ModelPrice) -> bool:
            if obj.model_id not in in_force_by_model:
                current = price_in_force(model=obj.model)
                in_force_by_model[obj.model_id] = current.pk if current else None
            return in_force_by_model[obj.model_id] == obj.pk

        return [*self.list_display_base, in_force, "note"]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return ["created_at"]
        return self.readonly_fields

    def get_fields(self, request, obj=None):
        if obj is None:
            return [f for f in self.fields if f not in {"in_force_now", "calls_billed", "created_at"}]
        return self.fields

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.calls.exists():
            return False
        return super().has_delete_permission(request, obj)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        if request.method == "GET":
            obj = self.get_object(request, object_id)
            if obj is not None and self.has_change_permission(request, obj):
                billed = obj.calls.count()
                if billed:
                    messages.warning(
                        request,
                        f"{billed:,} calls were billed at this price version. Their recorded costs will "
                        "not change; to change the price from now on, add a new version with a later "
                        "effective date instead.",
                    )
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="Input $/1M", ordering="input_per_million")
    def input_price(self, obj: ModelPrice) -> str:
        return _per_million(obj.input_per_million)

    @admin.display(description="Cached input $/1M", ordering="cached_input_per_million")
    def cached_price(self, obj: ModelPrice) -> str:
        if obj.cached_input_per_million is None:
            return mark_safe('<span title="billed at the input price">= input</span>')
        return _per_million(obj.cached_input_per_million)

    @admin.display(description="Output $/1M", ordering="output_per_million")
    def output_price(self, obj: ModelPrice) -> str:
        return _per_million(obj.output_per_million)

    @admin.display(description="In force now", boolean=True)
    def in_force_now(self, obj: ModelPrice) -> bool:
        current = price_in_force(model=obj.model)
        return current is not None and current.pk == obj.pk

    @admin.display(description="Calls billed at this version")
    def calls_billed(self, obj: ModelPrice) -> str:
        return f"{obj.calls.count():,}"


# --- Budgets --------------------------------------------------------------------------------


def money(value: Decimal | None) -> str:
    """A budget amount: to the cent when it is a whole number of cents (limits
    as managers type them), else to the micro-dollar, as call costs are."""
    if value is None:
        return "—"
    value = Decimal(value)
    return usd(value, 2 if value == value.quantize(Decimal("0.01")) else 6)


def tokens(n: int) -> str:
    """'880k tokens', '2.5M tokens': short enough for a list column; the
    exact count is in the title."""
    if abs(n) >= 1_000_000:
        short = f"{n / 1_000_000:.3g}M"
    elif abs(n) >= 10_000:
        short = f"{n / 1_000:.3g}k"
    else:
        short = f"{n:,}"
    return format_html('<span title="{} tokens">{} tokens</span>', f"{n:,}", short)


def utilisation_tone(percent: float, warn_at) -> str:
    """Green below the first warning threshold, amber from it, red from the
    last one (or from 100% when there is only one threshold, or none)."""
    thresholds = sorted(t for t in (warn_at or []) if isinstance(t, int | float) and not isinstance(t, bool))
    if percent >= 100 or (len(thresholds) >= 2 and percent >= thresholds[-1]):
        return "bad"
    if thresholds and percent >= thresholds[0]:
        return "warn"
    return "ok"


def utilisation_bar(percent: float, warn_at, *, note: str = "") -> str:
    """A horizontal meter: the fill is the share of the limit spent or held
    (capped at the bar's end), ticks mark the warning thresholds."""
    tone = utilisation_tone(percent, warn_at)
    thresholds = [t for t in (warn_at or []) if isinstance(t, int | float) and not isinstance(t, bool) and 0 < t < 100]
    width = f"{min(max(percent, 0.0), 100.0):.1f}"
    ticks = format_html_join("", '<span class="gov-meter-tick" style="left: {}%"></span>', ((t,) for t in thresholds))
    title = f"{percent:.1f}% of the limit spent or held" + (f" by {note}" if note else "")
    if thresholds:
        title += " · warnings at " + ", ".join(f"{t:g}%" for t in thresholds)
    return format_html(
        '<div class="gov-meter gov-meter-{tone}" role="meter" aria-valuemin="0" aria-valuemax="100" '
        'aria-valuenow="{pct}" data-percent="{pct}" data-tone="{tone}" title="{title}">'
        '<span class="gov-meter-track"><span class="gov-meter-fill" style="width: {width}%"></span>{ticks}</span>'
        '<span class="gov-meter-label">{pct}%</span></div>',
        tone=tone,
        pct=f"{percent:.1f}",
        width=width,
        ticks=ticks,
        title=title,
    )


def per_subject(budget: Budget) -> bool:
    return budget.scope == Budget.Scope.END_USER and not budget.end_user


def _zone(tz_name: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def in_zone(value: datetime | None, tz_name: str) -> str:
    """A full timestamp in the budget's own zone, e.g. '2026-12-01 00:00 CET'."""
    if value is None:
        return "—"
    return f"{value.astimezone(_zone(tz_name)):%Y-%m-%d %H:%M %Z}"


SCOPE_SHORT = {
    Budget.Scope.ORGANISATION: "organisation",
    Budget.Scope.APPLICATION: "application",
    Budget.Scope.API_KEY: "API key",
    Budget.Scope.END_USER: "end user",
    Budget.Scope.STEP: "step",
}
PERIOD_SHORT = {Budget.Period.DAY: "Daily", Budget.Period.WEEK: "Weekly", Budget.Period.MONTH: "Monthly"}


def short_when(value: datetime, tz_name: str) -> str:
    """'Dec 20 14:00' in the budget's zone (with the year when not this year)."""
    zone = _zone(tz_name)
    local = value.astimezone(zone)
    fmt = "%b %d %H:%M" if local.year == timezone.now().astimezone(zone).year else "%Y-%m-%d %H:%M"
    return local.strftime(fmt)


class BudgetForm(forms.ModelForm):
    class Meta:
        model = Budget
        fields = "__all__"
        labels = {"api_key": "API key", "timezone": "Time zone"}
        widgets = {
            "warn_at": forms.TextInput(attrs={"size": 20, "placeholder": "[50, 80, 95]"}),
            "end_user": forms.TextInput(attrs={"size": 30}),
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "50.00", not "50.000000": cents unless the limit really has more digits.
        limit = self.initial.get("limit_usd")
        if isinstance(limit, Decimal) and limit == limit.quantize(Decimal("0.01")):
            self.initial["limit_usd"] = f"{limit:.2f}"


class BudgetStatusMixin:
    """Budget status (budgets.forecast.status) once per budget per request,
    shared by the columns and read-only fields that show it."""

    def _status(self, obj: Budget) -> forecast.BudgetStatus:
        cached = getattr(obj, "_gov_status", None)
        if cached is None:
            cached = obj._gov_status = forecast.status(budget=obj)
        return cached


@admin.register(Budget)
class BudgetAdmin(BudgetStatusMixin, HistoryAdmin):
    """Budgets are deactivated, never deleted: their periods, reservations
    and events point at them (and keep them)."""

    form = BudgetForm
    list_display = [
        "name",
        "scope_display",
        "period_display",
        "limit_display",
        "spent_display",
        "reserved_display",
        "remaining_display",
        "utilisation_display",
        "forecast_display",
        "active",
    ]
    list_display_links = ["name"]
    list_filter = ["scope", "period", "application", "is_active", "hard_cap"]
    search_fields = ["name", "application__slug", "end_user", "step"]
    list_select_related = ["application", "api_key__application"]
    list_per_page = 50
    change_form_template = "admin/budgets/budget/change_form.html"
    status_fields = [
        "current_period",
        "utilisation_display",
        "spent_display",
        "reserved_display",
        "remaining_display",
        "forecast_display",
    ]
    readonly_fields = [*status_fields, "created_at"]
    config_fieldsets = [
        (None, {"fields": ["name", "is_active"]}),
        (
            "Scope",
            {
                "fields": ["scope", "application", "api_key", "end_user", "step"],
                "description": "What the budget counts: everything, one application, one key, an application's "
                "end users, or one pipeline step (X-Step) of an application.",
            },
        ),
        ("Limit and period", {"fields": ["period", "timezone", ("limit_usd", "limit_tokens"), "warn_at", "hard_cap"]}),
    ]

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return self.config_fieldsets
        return [
            ("Status this period", {"fields": self.status_fields}),
            *self.config_fieldsets,
            ("Record", {"fields": ["created_at"], "classes": ["collapse"]}),
        ]

    def get_readonly_fields(self, request, obj=None):
        return ["created_at"] if obj is None else self.readonly_fields

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "api_key":
            from governance.models import ApiKey

            kwargs["queryset"] = ApiKey.objects.select_related("application")
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and (obj.periods.exists() or obj.events.exists()):
            return False  # deactivate it instead: its accounting history stays
        return super().has_delete_permission(request, obj)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        obj = self.get_object(request, object_id)
        if obj is not None:
            extra_context.update(self.recent_activity(request, obj))
        return super().change_view(request, object_id, form_url, extra_context)

    def recent_activity(self, request, obj: Budget) -> dict:
        """The short tables under the form: recent periods and cost events."""
        out: dict = {}
        if request.user.has_perm("budgets.view_budgetperiod"):
            rows = list(BudgetPeriod.objects.filter(budget=obj).order_by("-period_start", "subject")[:8])
            for row in rows:
                row.budget = obj
                row.gov_bar = utilisation_bar(utilisation_of(row), obj.warn_at)
                row.gov_start = in_zone(row.period_start, obj.timezone) if obj.period != Budget.Period.NONE else "—"
                row.gov_end = in_zone(row.period_end, obj.timezone) if row.period_end else "—"
                row.gov_spent = money(row.spent_usd)
                row.gov_reserved = money(row.reserved_usd)
                row.gov_tokens = f"{row.spent_tokens:,} + {row.reserved_tokens:,} held"
            out["gov_periods"] = rows
            out["gov_per_subject"] = per_subject(obj)
        if request.user.has_perm("budgets.view_costevent"):
            events = list(CostEvent.objects.filter(budget=obj).order_by("-created_at")[:10])
            for event in events:
                event.gov_when = when(event.created_at)
                event.gov_url = reverse("admin:budgets_costevent_change", args=[event.pk])
            out["gov_events"] = events
            out["gov_events_url"] = reverse("admin:budgets_costevent_changelist") + "?" + urlencode(
                {"budget__id__exact": obj.pk}
            )
        return out

    # Columns and status fields -------------------------------------------------------------

    @admin.display(description="Scope", ordering="scope")
    def scope_display(self, obj: Budget) -> str:
        label = tone_badge(
            SCOPE_SHORT.get(obj.scope, obj.scope),
            "info" if obj.scope == Budget.Scope.ORGANISATION else "muted",
            title=obj.get_scope_display(),
        )
        if obj.scope == Budget.Scope.ORGANISATION:
            return label
        if obj.scope == Budget.Scope.API_KEY:
            target = admin_link(obj.api_key) if obj.api_key_id else "—"
        else:
            target = admin_link(obj.application) if obj.application_id else "—"
            if obj.scope == Budget.Scope.END_USER:
                target = format_html(
                    "{} · {}", target, obj.end_user or mark_safe('<span class="gov-quiet">each end user</span>')
                )
            elif obj.scope == Budget.Scope.STEP:
                target = format_html("{} · step <code>{}</code>", target, obj.step)
        return format_html("{}<br>{}", label, target)

    @admin.display(description="Period", ordering="period")
    def period_display(self, obj: Budget) -> str:
        if obj.period == Budget.Period.NONE:
            return "lifetime"
        return format_html(
            '<span title="{}">{}</span><br><span class="gov-quiet">{}</span>',
            obj.get_period_display(),
            PERIOD_SHORT.get(obj.period, obj.period),
            obj.timezone,
        )

    @admin.display(description="Limit", ordering="limit_usd")
    def limit_display(self, obj: Budget) -> str:
        """The limit(s), and whether the cap is hard (requests refused) or
        only warns: the list's "hard cap yes/no"."""
        parts = []
        if obj.limit_usd is not None:
            parts.append(money(obj.limit_usd))
        if obj.limit_tokens is not None:
            parts.append(tokens(obj.limit_tokens))
        if obj.hard_cap:
            parts.append(
                format_html('<span class="gov-quiet" title="{}">hard cap</span>', "Requests that could pass it are refused")
            )
        else:
            parts.append(tone_badge("warn only", "warn", "Not a hard cap: requests pass it, warnings are raised"))
        return format_html_join(mark_safe("<br>"), "{}", ((p,) for p in parts))

    @admin.display(description="Spent")
    def spent_display(self, obj: Budget) -> str:
        st = self._status(obj)
        lines = [money(st.spent_usd)]
        if obj.limit_tokens is not None:
            lines.append(tokens(st.spent_tokens))
        if per_subject(obj) and st.subjects:
            lines.append(f"{st.subjects:,} end user{'s' if st.subjects != 1 else ''}")
        return self._lines(lines)

    @admin.display(description="Held")
    def reserved_display(self, obj: Budget) -> str:
        st = self._status(obj)
        lines = [money(st.reserved_usd)]
        if obj.limit_tokens is not None:
            lines.append(tokens(st.reserved_tokens))
        return self._lines(lines)

    @admin.display(description="Remaining")
    def remaining_display(self, obj: Budget) -> str:
        st = self._status(obj)
        if per_subject(obj):
            return format_html('<span class="gov-quiet">{}</span>', "per end user")
        lines = []
        if st.remaining_usd is not None:
            lines.append(money(st.remaining_usd))
        if st.remaining_tokens is not None:
            lines.append(tokens(st.remaining_tokens))
        return self._lines(lines) if lines else "—"

    @admin.display(description="Utilisation")
    def utilisation_display(self, obj: Budget) -> str:
        st = self._status(obj)
        if per_subject(obj):
            return utilisation_bar(st.utilisation_percent, obj.warn_at, note="the end user who used the most")
        return utilisation_bar(st.utilisation_percent, obj.warn_at)

    @admin.display(description="Forecast")
    def forecast_display(self, obj: Budget) -> str:
        st = self._status(obj)
        if per_subject(obj):
            return format_html(
                '<span class="gov-quiet" title="{}">{}</span>', "Not forecast for budgets counted per end user", "per end user"
            )
        if st.pace_usd_per_hour is None:
            return format_html(
                '<span class="gov-quiet" title="{}">{}</span>',
                "No settled spend in the last 3 days to forecast from",
                "no recent spend",
            )
        pace = f"At {usd(st.pace_usd_per_hour, 4)}/hour, the pace of settled spend over the recent past"
        if st.projected_usd is not None:
            first = format_html(
                '<span title="{}">{} by period end</span>', pace, money(st.projected_usd.quantize(Decimal("0.01")))
            )
        else:
            first = format_html("{}/hour", money(st.pace_usd_per_hour.quantize(Decimal("0.000001"))))
        if obj.limit_usd is None:
            return first
        if st.remaining_usd is not None and st.remaining_usd <= 0:
            cap = tone_badge("limit reached", "bad")
        elif st.cap_reached_at is not None:
            cap = format_html(
                '<span class="gov-badge gov-{} gov-keep-case" title="{}">{}</span>',
                "bad" if obj.hard_cap else "warn",
                f"{in_zone(st.cap_reached_at, obj.timezone)}. {pace}.",
                f"cap reached ~{short_when(st.cap_reached_at, obj.timezone)}",
            )
        else:
            cap = tone_badge("not this period", "ok", title=f"The cap is not reached this period. {pace}.")
        return format_html("{}<br>{}", first, cap)

    @admin.display(description="Active", boolean=True, ordering="is_active")
    def active(self, obj: Budget) -> bool:
        return obj.is_active

    @admin.display(description="Current period")
    def current_period(self, obj: Budget) -> str:
        st = self._status(obj)
        if obj.period == Budget.Period.NONE:
            return "No period: the budget counts everything since it was created."
        return f"{in_zone(st.period_start, obj.timezone)} → {in_zone(st.period_end, obj.timezone)}"

    @staticmethod
    def _lines(lines: list) -> str:
        first, *rest = lines
        return format_html(
            "{}{}", first, format_html_join("", '<br><span class="gov-quiet">{}</span>', ((x,) for x in rest))
        )


# --- Cost regression rules and cost events ------------------------------------------------


@admin.register(CostRegressionRule)
class CostRegressionRuleAdmin(HistoryAdmin):
    """Rules are deactivated, not deleted: deleting one would delete its events."""

    list_display = ["__str__", "application_link", "metric", "ratio", "windows", "min_samples", "is_active", "events"]
    list_filter = ["application", "metric", "is_active"]
    list_select_related = ["application"]
    list_per_page = 50
    fields = ["application", "metric", "max_ratio", "recent_hours", "baseline_days", "min_samples", "is_active"]

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.events.exists():
            return False
        return super().has_delete_permission(request, obj)

    @admin.display(description="Application", ordering="application__slug")
    def application_link(self, obj: CostRegressionRule) -> str:
        return admin_link(obj.application)

    @admin.display(description="Alert above", ordering="max_ratio")
    def ratio(self, obj: CostRegressionRule) -> str:
        return f"× {obj.max_ratio}"

    @admin.display(description="Compares")
    def windows(self, obj: CostRegressionRule) -> str:
        return f"last {obj.recent_hours} h with the {obj.baseline_days} days before"

    @admin.display(description="Events")
    def events(self, obj: CostRegressionRule) -> str:
        n = obj.events.count()
        if not n:
            return "—"
        url = reverse("admin:budgets_costevent_changelist") + "?" + urlencode({"rule__id__exact": obj.pk})
        return format_html('<a href="{}">{}</a>', url, count(n))


EVENT_TONE = {CostEvent.Kind.BUDGET_WARNING: "warn", CostEvent.Kind.COST_REGRESSION: "bad"}
EVENT_LABEL = {CostEvent.Kind.BUDGET_WARNING: "budget warning", CostEvent.Kind.COST_REGRESSION: "cost regression"}


@admin.register(CostEvent)
class CostEventAdmin(ReadOnlyAdminMixin, RequestAwareAdmin):
    """Budget warnings and cost regressions as they were raised: a record,
    read-only for everyone, superusers included."""

    list_display = ["created", "kind_badge", "application_link", "source", "message"]
    list_display_links = ["created"]
    list_filter = ["kind", "application", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["message"]
    list_select_related = ["application", "budget", "rule__application"]
    list_per_page = 50
    ordering = ["-created_at"]
    fields = ["created", "kind_badge", "application_link", "budget_link", "rule_link", "message", "details_display"]
    readonly_fields = fields

    @admin.display(description="When", ordering="created_at")
    def created(self, obj: CostEvent) -> str:
        return when(obj.created_at)

    @admin.display(description="Kind", ordering="kind")
    def kind_badge(self, obj: CostEvent) -> str:
        return tone_badge(EVENT_LABEL.get(obj.kind, obj.kind), EVENT_TONE.get(obj.kind, "muted"), obj.get_kind_display())

    @admin.display(description="Application", ordering="application__slug")
    def application_link(self, obj: CostEvent) -> str:
        return admin_link(obj.application)

    @admin.display(description="Budget / rule")
    def source(self, obj: CostEvent) -> str:
        if obj.budget_id:
            return admin_link(obj.budget)
        if obj.rule_id:
            return admin_link(obj.rule)
        return "—"

    @admin.display(description="Budget")
    def budget_link(self, obj: CostEvent) -> str:
        return admin_link(obj.budget)

    @admin.display(description="Cost regression rule")
    def rule_link(self, obj: CostEvent) -> str:
        return admin_link(obj.rule)

    @admin.display(description="Details")
    def details_display(self, obj: CostEvent) -> str:
        if not obj.details:
            return "—"
        return format_html(
            '<pre class="gov-json">{}</pre>', json.dumps(obj.details, indent=2, ensure_ascii=False, default=str)
        )
