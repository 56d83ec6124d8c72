"""Admin for applications (with their degradation ladder, step policies and
fallback routes) and their keys, the shared admin helpers, the site branding,
the auditors' "Configuration changes" screen and the on-call "Circuit
breakers" screen.

Keys are issued and revoked only through governance.services, so the admin
never sees a secret except once, right after issuing it, and history records
who did what.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename, get_user_model
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import CharField, Q, Value
from django.http import HttpRequest, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, path, reverse
from django.utils.html import format_html
from django.utils.safestring import mark_safe
from django.utils.text import capfirst
from simple_history.admin import SimpleHistoryAdmin

from budgets.models import Budget, DegradationRule, StepPolicy
from governance.models import ApiKey, Application, FallbackRoute
from governance.services import KeyRevoked, create_api_key, revoke_api_key, set_api_key_limits

admin.site.site_header = "GenAI governance"
admin.site.site_title = "GenAI governance"
admin.site.index_title = "Governance and audit"
# The audit lists are wide (ten columns plus filters): give them the room the
# app sidebar would take. Home and breadcrumbs remain one click away.
admin.site.enable_nav_sidebar = False

# Fields whose values never appear on any admin screen, history diffs included.
SECRET_FIELDS = frozenset({"key_hash", "provider_api_key"})
DERIVED_FIELDS = frozenset({"provider_key_fingerprint"})  # set by the model, shown read-only


# --- Shared helpers -----------------------------------------------------------------------

_current_request: contextvars.ContextVar[HttpRequest | None] = contextvars.ContextVar(
    "governance_admin_request", default=None
)


def usd(value: Decimal | None, places: int = 6) -> str:
    if value is None:
        return "—"
    return f"${Decimal(value):,.{places}f}"


def milliseconds(value: int | None) -> str:
    return "—" if value is None else f"{value:,} ms"


def when(value: datetime | None) -> str:
    """A compact, sortable local timestamp for lists and timelines."""
    if value is None:
        return "—"
    from django.utils import timezone

    return f"{timezone.localtime(value):%Y-%m-%d %H:%M:%S}"


def count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def tone_badge(label: str, tone: str, title: str = "") -> str:
    """A coloured pill (tones: ok, warn, bad, info, muted; see governance_styles.html)."""
    if title:
        return format_html('<span class="gov-badge gov-{}" title="{}">{}</span>', tone, title, label)
    return format_html('<span class="gov-badge gov-{}">{}</span>', tone, label)


def catalogue_choices(*, current: str = "", blank: bool = True) -> list[tuple[str, str]]:
    """Active catalogued models for a model-name select, unpriced ones marked
    (they are refused, so the model's clean() rejects them with its message),
    plus the current value if it is no longer an active catalogued model."""
    from budgets.models import LanguageModel
    from budgets.selectors import models_in_service

    priced = {pm.model.name for pm in models_in_service()}
    names = list(LanguageModel.objects.filter(is_active=True).values_list("name", flat=True))
    choices = [("", "---------")] if blank else []
    choices += [(n, n if n in priced else f"{n} (no price: refused)") for n in names]
    return with_current_choice(choices, current)


def with_current_choice(choices: list[tuple[str, str]], current: str) -> list[tuple[str, str]]:
    if current and current not in {value for value, _ in choices}:
        return [*choices, (current, f"{current} (not an active catalogued model)")]
    return choices


def can_view(obj: Any) -> bool:
    """Whether the current admin user may open obj's admin page."""
    model_admin = admin.site._registry.get(type(obj))
    request = _current_request.get()
    return bool(model_admin and request and model_admin.has_view_or_change_permission(request, obj))


def admin_link(obj: Any, text: str | None = None) -> str:
    """A link to obj's admin page when the current user may view it, else
    its plain label. Works in list_display and readonly fields."""
    if obj is None:
        return "—"
    label = text if text is not None else str(obj)
    if not can_view(obj):
        return label
    url = reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, label)


class RequestAwareAdmin(admin.ModelAdmin):
    """Makes the request available to display helpers (`admin_link`) through
    a context variable: safe across threads and async tasks, unlike an
    attribute on the shared ModelAdmin instance."""

    def _with_request(self, request, view, *args, **kwargs):
        token = _current_request.set(request)
        try:
            response = view(request, *args, **kwargs)
            if hasattr(response, "render") and not getattr(response, "is_rendered", True):
                response.render()
            return response
        finally:
            _current_request.reset(token)

    def changelist_view(self, request, extra_context=None):
        return self._with_request(request, super().changelist_view, extra_context)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        return self._with_request(request, super().changeform_view, object_id, form_url, extra_context)

    def history_view(self, request, object_id, extra_context=None):
        return self._with_request(request, super().history_view, object_id, extra_context)


class ReadOnlyAdminMixin:
    """Nothing can be added, changed or deleted through the admin, by anyone,
    superusers included. Those with view permission see read-only pages."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class HistoryAdmin(RequestAwareAdmin, SimpleHistoryAdmin):
    """SimpleHistoryAdmin, except that a historical version can be restored
    ("reverted") only by someone allowed to change the object: the library
    lets anyone who may merely view history POST the revert form."""

    allow_revert = True

    def revert_disabled(self, request, obj=None):
        if not self.allow_revert or not self.has_change_permission(request, obj):
            return True
        return super().revert_disabled(request, obj)

    def history_form_view(self, request, object_id, version_id, extra_context=None):
        if request.method == "POST" and self.revert_disabled(request, None):
            raise PermissionDenied
        token = _current_request.set(request)
        try:
            response = super().history_form_view(request, object_id, version_id, extra_context)
            if hasattr(response, "render") and not getattr(response, "is_rendered", True):
                response.render()
            return response
        finally:
            _current_request.reset(token)


# --- Applications -------------------------------------------------------------------------


class ApplicationForm(forms.ModelForm):
    provider_api_key = forms.CharField(
        label="Provider API key",
        required=False,
        strip=True,
        max_length=300,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Overrides OPENAI_API_KEY for this application only. Never displayed: "
        "type a new key to replace the stored one, leave blank to keep it.",
    )
    clear_provider_api_key = forms.BooleanField(
        label="Remove the stored provider key", required=False, help_text="Fall back to OPENAI_API_KEY."
    )

    class Meta:
        model = Application
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The stored key must not even reach the form's initial data.
        self.initial["provider_api_key"] = ""
        self.fields["default_model"] = forms.ChoiceField(
            label="Default model",
            choices=self._model_choices(),
            help_text=Application._meta.get_field("default_model").help_text,
        )

    def _model_choices(self) -> list[tuple[str, str]]:
        return catalogue_choices(current=self.instance.default_model if self.instance else "")

    def _stored_key(self) -> str:
        if not self.instance.pk:
            return ""
        stored = Application.objects.filter(pk=self.instance.pk).values_list("provider_api_key", flat=True).first()
        return stored or ""

    def clean(self):
        cleaned = super().clean()
        new_key = cleaned.get("provider_api_key") or ""
        if cleaned.get("clear_provider_api_key"):
            if new_key:
                self.add_error("clear_provider_api_key", "Either type a new key or remove the stored one, not both.")
            cleaned["provider_api_key"] = ""
        elif not new_key:
            # Left blank: keep what is stored (read from the database, not from
            # the instance, which may be a historical version being restored).
            cleaned["provider_api_key"] = self._stored_key()
        return cleaned


class ApiKeyInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = ApiKey
    fields = ["prefix", "name", "limits", "created_at", "created_by", "last_used_at", "revoked_at"]
    readonly_fields = fields
    extra = 0
    show_change_link = True
    verbose_name_plural = "API keys (issue, revoke and set rate limits under API keys)"

    @admin.display(description="Rate limits")
    def limits(self, obj: ApiKey) -> str:
        return rate_limits(obj.requests_per_minute, obj.tokens_per_minute, none="application's")


def rate_limits(rpm: int | None, tpm: int | None, *, none: str = "unlimited") -> str:
    parts = [f"{rpm:,} req/min" if rpm else "", f"{tpm:,} tokens/min" if tpm else ""]
    return " · ".join(p for p in parts if p) or none


class CatalogueModelInline(admin.TabularInline):
    """An inline with a model-name field offered as a select of the catalogue
    (computed once per page, not once per row). `after_fieldset` names the
    application fieldset the inline is shown under (see the change form)."""

    model_field = ""
    after_fieldset: str | None = None
    extra = 0

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        field = formset.form.base_fields.get(self.model_field)
        if field is not None:
            model_field = self.model._meta.get_field(self.model_field)
            formset.form.base_fields[self.model_field] = forms.ChoiceField(
                label=capfirst(model_field.verbose_name),
                choices=catalogue_choices(blank=model_field.blank),
                required=not model_field.blank,
                help_text=model_field.help_text,
            )
        return formset


class CatalogueModelInlineForm(forms.ModelForm):
    model_field = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        field = self.fields.get(self.model_field)
        if isinstance(field, forms.ChoiceField):
            # A value no longer in the catalogue stays visible (and fails the model's clean()).
            field.choices = with_current_choice(list(field.choices), getattr(self.instance, self.model_field, ""))


NARROW = {"style": "width: 5em"}


class DegradationRuleForm(CatalogueModelInlineForm):
    model_field = "switch_to_model"

    class Meta:
        model = DegradationRule
        fields = "__all__"
        labels = {"threshold_percent": "Threshold (%)", "max_tokens_cap": "Cap max_tokens at"}
        widgets = {
            "threshold_percent": forms.NumberInput(attrs=NARROW),
            "max_tokens_cap": forms.NumberInput(attrs=NARROW),
            "keep_last_turns": forms.NumberInput(attrs=NARROW),
            "position": forms.NumberInput(attrs={"style": "width: 3.5em"}),
        }


class DegradationRuleInline(CatalogueModelInline):
    """The ladder: every rung whose threshold the budget's utilisation has
    reached applies, lowest first; a refusing rung ends the ladder."""

    model = DegradationRule
    form = DegradationRuleForm
    model_field = "switch_to_model"
    after_fieldset = "Budgets & degradation"
    fields = [
        "threshold_percent",
        "budget",
        "switch_to_model",
        "max_tokens_cap",
        "keep_last_turns",
        "refuse",
        "refusal_mode",
        "position",
    ]
    ordering = ["threshold_percent", "position"]
    verbose_name = "degradation rule"
    verbose_name_plural = "Degradation ladder (rules apply from the lowest threshold up; a refusal ends the ladder)"

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        field = formset.form.base_fields.get("budget")
        if field is not None:
            # Only budgets that can count this application's requests.
            applies = Q(scope=Budget.Scope.ORGANISATION)
            if obj is not None:
                applies |= Q(application=obj) | Q(api_key__application=obj)
            field.queryset = Budget.objects.filter(applies).order_by("name")
            field.empty_label = "(the most used one)"
            # A row of a ladder is no place to create or edit budgets.
            for flag in ("can_add_related", "can_change_related", "can_delete_related", "can_view_related"):
                setattr(field.widget, flag, False)
        return formset


class StepPolicyForm(forms.ModelForm):
    class Meta:
        model = StepPolicy
        fields = "__all__"
        widgets = {
            "step": forms.TextInput(attrs={"size": 16, "placeholder": "(default)"}),
            "max_input_tokens": forms.NumberInput(attrs={"style": "width: 7em"}),
            "max_output_tokens": forms.NumberInput(attrs={"style": "width: 7em"}),
        }


class StepPolicyInline(admin.TabularInline):
    model = StepPolicy
    form = StepPolicyForm
    fields = ["step", "max_input_tokens", "max_output_tokens", "oversize"]
    extra = 0
    after_fieldset = "Budgets & degradation"
    verbose_name_plural = "Step policies (input/output caps per X-Step; a blank step is the default)"


class FallbackRouteForm(CatalogueModelInlineForm):
    """Same hidden-key pattern as ApplicationForm: the stored key never
    reaches the page; blank keeps it, a new value replaces it."""

    model_field = "model"
    provider_api_key = forms.CharField(
        label="Provider API key",
        required=False,
        strip=True,
        max_length=300,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password", "size": 18}),
        help_text="Blank keeps the stored key (or the application's, if none).",
    )
    clear_provider_api_key = forms.BooleanField(label="Remove stored key", required=False)

    class Meta:
        model = FallbackRoute
        fields = "__all__"
        widgets = {"position": forms.NumberInput(attrs={"style": "width: 3.5em"})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial["provider_api_key"] = ""

    def _stored_key(self) -> str:
        if not self.instance.pk:
            return ""
        stored = FallbackRoute.objects.filter(pk=self.instance.pk).values_list("provider_api_key", flat=True).first()
        return stored or ""

    def clean(self):
        cleaned = super().clean()
        if "provider_api_key" not in self.fields:
            return cleaned
        new_key = cleaned.get("provider_api_key") or ""
        if cleaned.get("clear_provider_api_key"):
            if new_key:
                self.add_error("clear_provider_api_key", "Either type a new key or remove the stored one, not both.")
            cleaned["provider_api_key"] = ""
        elif not new_key:
            cleaned["provider_api_key"] = self._stored_key()
        return cleaned


class FallbackRouteInline(CatalogueModelInline):
    model = FallbackRoute
    form = FallbackRouteForm
    model_field = "model"
    after_fieldset = "Resilience"
    fields = ["position", "model", "provider_base_url", "key_status", "provider_api_key", "clear_provider_api_key"]
    readonly_fields = ["key_status"]
    ordering = ["position"]
    verbose_name_plural = "Fallback routes (tried in order when the primary model fails, within the deadline)"

    def get_fields(self, request, obj=None):
        fields = list(super().get_fields(request, obj))
        if not self.has_change_permission(request, obj):
            # Read-only view: a read-only "provider_api_key" would print the key.
            fields = [f for f in fields if f not in {"provider_api_key", "clear_provider_api_key"}]
        return fields

    @admin.display(description="Stored key")
    def key_status(self, obj: FallbackRoute) -> str:
        if obj is None or obj.pk is None:
            return "—"
        if not obj.provider_api_key:
            return "none: the application's"
        return f"stored, {obj.provider_key_fingerprint} (never displayed)"


@admin.register(Application)
class ApplicationAdmin(HistoryAdmin):
    form = ApplicationForm
    list_display = ["slug", "name", "status", "is_active", "default_model", "owner", "provider_key", "created_at"]
    list_filter = ["status", "is_active"]
    search_fields = ["slug", "name"]
    list_select_related = ["owner"]
    list_per_page = 50
    readonly_fields = ["provider_key_status", "created_at"]
    prepopulated_fields = {"slug": ["name"]}
    # Shown under the fieldset each names (after_fieldset), by
    # templates/admin/governance/application/change_form.html.
    inlines = [DegradationRuleInline, StepPolicyInline, FallbackRouteInline, ApiKeyInline]
    fieldsets = [
        (None, {"fields": ["slug", "name", "owner", "status", "is_active", "created_at"]}),
        ("Defaults", {"fields": ["default_model", "default_temperature", "default_max_tokens", "system_prompt"]}),
        (
            "Provider override",
            {"fields": ["provider_base_url", "provider_key_status", "provider_api_key", "clear_provider_api_key"]},
        ),
        (
            "Budgets & degradation",
            {
                "fields": ["polite_refusal_message"],
                "description": "Budgets themselves are under Budgets. The ladder below says what happens "
                "as a budget fills up; a rule that refuses politely answers with this message.",
            },
        ),
        (
            "Resilience",
            {
                "fields": [
                    "request_deadline_s",
                    ("connect_timeout_s", "read_timeout_s"),
                    "max_retries",
                    ("retry_backoff_ms", "retry_backoff_max_ms"),
                ],
                "description": "Retries and fallback routes (below) never run past the deadline.",
            },
        ),
        (
            "Limits & cache",
            {"fields": [("requests_per_minute", "tokens_per_minute"), "response_cache_ttl_s"]},
        ),
        ("Failure replies", {"fields": ["failure_reply", "slow_message", "down_message", "flagged_message"]}),
    ]

    def get_fieldsets(self, request, obj=None):
        fieldsets = [(n, {**o, "fields": list(o["fields"])}) for n, o in super().get_fieldsets(request, obj)]
        # Fields added to the model later still show up, under "Other".
        placed = set()
        for _, o in fieldsets:
            for f in o["fields"]:
                placed.update(f if isinstance(f, tuple | list) else [f])
        others = [
            f.name
            for f in Application._meta.fields
            if f.editable and not f.primary_key and f.name not in placed and f.name not in SECRET_FIELDS | DERIVED_FIELDS
        ]
        if others:
            fieldsets.append(("Other", {"fields": others}))
        if obj is not None and not self.has_change_permission(request, obj):
            # Read-only view: the key inputs mean nothing there.
            drop = {"provider_api_key", "clear_provider_api_key"}
            fieldsets = [(n, {**o, "fields": [f for f in o["fields"] if f not in drop]}) for n, o in fieldsets]
        return fieldsets

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        # Inlines whose fieldset is not shown fall back to the usual place.
        context["gov_fieldset_names"] = [name for name, _ in self.get_fieldsets(request, obj)]
        return super().render_change_form(request, context, add, change, form_url, obj)

    @admin.display(description="Provider key", boolean=True)
    def provider_key(self, obj: Application) -> bool:
        return bool(obj.provider_api_key)

    @admin.display(description="Stored provider key")
    def provider_key_status(self, obj: Application) -> str:
        if obj is None or not obj.provider_api_key:
            return "None: uses OPENAI_API_KEY"
        return f"A key is stored, fingerprint {obj.provider_key_fingerprint} (the key is never displayed)"


# --- API keys -----------------------------------------------------------------------------


class ApiKeyAddForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["application", "name"]


class RevokedFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(HistoryAdmin):
    """Keys are issued by the add form (through create_api_key, which shows
    the secret once) and revoked by an action or the button on a key's page
    (through revoke_api_key). On a live key only the rate limits can be
    edited; a POST that tries to set any other field is refused. Keys are
    never deleted: calls keep pointing at them."""

    allow_revert = False  # restoring an old version could un-revoke a key
    list_display = [
        "prefix_display",
        "name",
        "application_link",
        "limits",
        "created_at",
        "created_by",
        "last_used_at",
        "state",
    ]
    list_filter = [RevokedFilter, "application"]
    search_fields = ["=prefix", "name", "application__slug"]
    list_select_related = ["application", "created_by"]
    list_per_page = 50
    actions = ["revoke_keys"]
    change_form_template = "admin/governance/apikey/change_form.html"
    readonly_fields = [
        "prefix_display",
        "name",
        "application_link",
        "created_at",
        "created_by",
        "last_used_at",
        "revoked_at",
    ]
    limit_fields = ("requests_per_minute", "tokens_per_minute")

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
            kwargs["fields"] = ["application", "name"]
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request, obj=None):
        return ["application", "name"] if obj is None else [*self.readonly_fields, *self.limit_fields]

    def get_fieldsets(self, request, obj=None):
        if obj is None:
            return [(None, {"fields": ["application", "name"]})]
        app = obj.application
        return [
            (None, {"fields": self.readonly_fields}),
            (
                "Rate limits",
                {
                    "fields": [self.limit_fields],
                    "description": "Blank: only the application's limits apply "
                    f"({rate_limits(app.requests_per_minute, app.tokens_per_minute)} for {app.slug}).",
                },
            ),
        ]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        if obj.revoked_at is not None:
            return [*self.readonly_fields, *self.limit_fields]
        return self.readonly_fields

    def has_delete_permission(self, request, obj=None):
        return False

    def get_urls(self):
        return [
            path(
                "<path:object_id>/revoke/",
                self.admin_site.admin_view(self.revoke_view),
                name="governance_apikey_revoke",
            ),
            *super().get_urls(),
        ]

    # Display ---------------------------------------------------------------------------

    @admin.display(description="Key", ordering="prefix")
    def prefix_display(self, obj: ApiKey) -> str:
        return format_html("<code>{}…</code>", obj.prefix)

    @admin.display(description="Application", ordering="application__slug")
    def application_link(self, obj: ApiKey) -> str:
        return admin_link(obj.application)

    @admin.display(description="Rate limits")
    def limits(self, obj: ApiKey) -> str:
        return rate_limits(obj.requests_per_minute, obj.tokens_per_minute, none="application's")

    @admin.display(description="State", ordering="revoked_at")
    def state(self, obj: ApiKey) -> str:
        if obj.revoked_at:
            return format_html(
                '<span class="gov-badge gov-bad" title="{}">revoked</span>', f"{obj.revoked_at:%Y-%m-%d %H:%M}"
            )
        return mark_safe('<span class="gov-badge gov-ok">active</span>')

    # Issuing ---------------------------------------------------------------------------

    def save_model(self, request, obj, form, change):
        if change:
            # Only the rate limits, on the row as it is now (not the copy loaded
            # with the form, which a concurrent revoke may have overtaken).
            try:
                current = set_api_key_limits(
                    api_key=obj,
                    requests_per_minute=obj.requests_per_minute,
                    tokens_per_minute=obj.tokens_per_minute,
                    actor=request.user,
                )
            except KeyRevoked:
                raise PermissionDenied from None
            obj.revoked_at, obj.last_used_at = current.revoked_at, current.last_used_at
            return
        issued = create_api_key(
            application=form.cleaned_data["application"], name=form.cleaned_data["name"], actor=request.user
        )
        for f in ApiKey._meta.concrete_fields:
            setattr(obj, f.attname, getattr(issued.api_key, f.attname))
        obj._state.adding = False
        obj._state.db = issued.api_key._state.db
        request._issued_api_key_secret = issued.secret

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(request, "_issued_api_key_secret", None)
        if secret:
            messages.success(
                request,
                format_html(
                    "New key for <b>{}</b>: <code class=\"gov-secret\">{}</code><br>"
                    "Copy it now, it will not be shown again. Only its SHA-256 hash is stored.",
                    obj.application.slug,
                    secret,
                ),
            )
        # Straight to the key's page, never to "add another" with the secret lingering.
        return HttpResponseRedirect(reverse("admin:governance_apikey_change", args=[obj.pk]))

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        extra_context = extra_context or {}
        if object_id is not None:
            obj = self.get_object(request, object_id)
            if request.method == "POST" and obj is not None:
                # Only the rate limits of a live key; anything else is refused,
                # never silently ignored.
                posted = {k for k in request.POST if not k.startswith("_") and k != "csrfmiddlewaretoken"}
                model_fields = {f.name for f in ApiKey._meta.get_fields()}
                if obj.revoked_at is not None or (posted & model_fields) - set(self.limit_fields):
                    raise PermissionDenied
            extra_context["can_revoke"] = bool(
                obj is not None and obj.revoked_at is None and self.has_change_permission(request, obj)
            )
        return super().changeform_view(request, object_id, form_url, extra_context)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if change:
            editable = obj is not None and obj.revoked_at is None and self.has_change_permission(request, obj)
            context.update(
                title="API key",
                show_save=editable,
                show_save_and_continue=editable,
                show_save_and_add_another=False,
                show_delete=False,
            )
        else:
            context.update(show_save_and_add_another=False, show_save_and_continue=False)
        return super().render_change_form(request, context, add, change, form_url, obj)

    # Revoking --------------------------------------------------------------------------

    def _revoke(self, request, key: ApiKey) -> bool:
        if key.revoked_at is not None:
            return False
        revoke_api_key(api_key=key, actor=request.user)
        self.log_change(request, key, [{"changed": {"fields": ["Revoked at"]}}])
        return True

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request, queryset):
        revoked = sum(self._revoke(request, key) for key in queryset.select_related("application"))
        already = queryset.count() - revoked
        msg = f"Revoked {revoked} key{'s' if revoked != 1 else ''}."
        if already:
            msg += f" {already} already revoked."
        self.message_user(request, msg, messages.SUCCESS)

    def revoke_view(self, request, object_id):
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        key = get_object_or_404(ApiKey, pk=object_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        if self._revoke(request, key):
            self.message_user(request, f"Key {key.prefix}… revoked.", messages.SUCCESS)
        else:
            self.message_user(request, f"Key {key.prefix}… was already revoked.", messages.WARNING)
        return HttpResponseRedirect(reverse("admin:governance_apikey_change", args=[key.pk]))


# --- Configuration changes (audit screen) --------------------------------------------------


AUDITED_APPS = ("governance", "budgets", "conversations")


def _audited_models() -> dict[str, type]:
    """Every model of the governed apps that keeps history (Application,
    ApiKey, LanguageModel, ModelPrice, and whatever configuration is given
    HistoricalRecords later), keyed by model name."""
    from django.apps import apps

    out = {}
    for label in AUDITED_APPS:
        for model in apps.get_app_config(label).get_models():
            if getattr(model._meta, "simple_history_manager_attribute", None):
                out[model._meta.model_name] = model
    return out


def _history_model(model):
    return getattr(model, model._meta.simple_history_manager_attribute).model


def viewable_audited_models(user) -> dict[str, type]:
    """The audited models whose history `user` may view."""
    out = {}
    for key, model in _audited_models().items():
        opts = _history_model(model)._meta
        if user.has_perm(f"{opts.app_label}.{get_permission_codename('view', opts)}"):
            out[key] = model
    return out


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: str
    new: str


@dataclass(frozen=True)
class ConfigurationChange:
    when: datetime
    user: Any
    kind: str  # key of _audited_models
    model_name: str
    object_id: Any
    object_repr: str
    change_type: str  # "+", "~", "-"
    changes: list[FieldChange]
    reason: str
    object_url: str | None
    history_url: str | None


_BOOKKEEPING = frozenset({"id", "created_at"})


def _display(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, datetime):
        # Microseconds only when present, so two instants never look equal.
        return (f"{value:%Y-%m-%d %H:%M:%S}" + (f".{value:%f}" if value.microsecond else "") + f" {value:%Z}").strip()
    return str(value)


def _field_label(model, name: str) -> str:
    try:
        return str(model._meta.get_field(name).verbose_name)
    except Exception:
        return name


def _describe(record, kind: str, model) -> ConfigurationChange:
    changes: list[FieldChange] = []
    tracked = [f.name for f in record.instance_type._meta.fields]
    excluded = [f for f in tracked if f in SECRET_FIELDS]
    if record.history_type == "~":
        previous = record.prev_record
        if previous is not None:
            delta = record.diff_against(previous, excluded_fields=excluded, foreign_keys_are_objs=True)
            for change in delta.changes:
                changes.append(FieldChange(_field_label(model, change.field), _display(change.old), _display(change.new)))
    elif record.history_type == "+":
        for f in record.instance_type._meta.fields:
            if f.name in SECRET_FIELDS or f.name in _BOOKKEEPING or not hasattr(record, f.attname):
                continue
            try:
                value = getattr(record, f.name) if f.is_relation else getattr(record, f.attname)
            except Exception:  # a related object since deleted
                value = getattr(record, f.attname, None)
            if value not in (None, ""):
                changes.append(FieldChange(_field_label(model, f.name), "", _display(value)))
    try:
        object_repr = str(record.instance)
    except Exception:
        object_repr = f"{model._meta.verbose_name} #{record.id}"
    opts = model._meta
    object_url = history_url = None
    try:
        if record.history_type != "-" and model._default_manager.filter(pk=record.id).exists():
            object_url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[record.id])
        history_url = reverse(f"admin:{opts.app_label}_{opts.model_name}_history", args=[record.id])
    except NoReverseMatch:
        pass
    return ConfigurationChange(
        when=record.history_date,
        user=record.history_user,
        kind=kind,
        model_name=capfirst(opts.verbose_name),
        object_id=record.id,
        object_repr=object_repr,
        change_type=record.history_type,
        changes=changes,
        reason=record.history_change_reason or "",
        object_url=object_url,
        history_url=history_url,
    )


def configuration_changes(
    *, models: dict[str, type], user_id: int | None = None, change_type: str | None = None
):
    """History rows of `models`, newest first, as one UNION ALL query of
    (kind, history_id, history_date) that the caller can paginate; rows of a
    page are then described with `describe_changes`."""
    parts = []
    for kind, model in models.items():
        qs = _history_model(model).objects.order_by()  # no ORDER BY inside a UNION part
        if user_id is not None:
            qs = qs.filter(history_user_id=user_id)
        if change_type:
            qs = qs.filter(history_type=change_type)
        parts.append(
            qs.annotate(kind=Value(kind, output_field=CharField())).values_list("kind", "history_id", "history_date")
        )
    if not parts:
        return []
    first, *rest = parts
    union = first.union(*rest, all=True) if rest else first
    return union.order_by("-history_date", "-history_id")


def describe_changes(*, rows, models: dict[str, type]) -> list[ConfigurationChange]:
    by_kind: dict[str, list[int]] = {}
    for kind, history_id, _ in rows:
        by_kind.setdefault(kind, []).append(history_id)
    records = {}
    for kind, ids in by_kind.items():
        for record in _history_model(models[kind]).objects.filter(history_id__in=ids).select_related("history_user"):
            records[(kind, record.history_id)] = record
    return [
        _describe(records[(kind, history_id)], kind, models[kind])
        for kind, history_id, _ in rows
        if (kind, history_id) in records
    ]


def configuration_changes_view(request: HttpRequest):
    models = viewable_audited_models(request.user)
    if not models:
        raise PermissionDenied
    selected_model = request.GET.get("model") or ""
    selected_user = request.GET.get("user") or ""
    selected_type = request.GET.get("type") or ""
    shown = {k: v for k, v in models.items() if not selected_model or k == selected_model}
    user_id = int(selected_user) if selected_user.isdigit() else None
    change_type = selected_type if selected_type in {"+", "~", "-"} else None

    rows = configuration_changes(models=shown, user_id=user_id, change_type=change_type)
    paginator = Paginator(rows, 50)
    page = paginator.get_page(request.GET.get("p"))
    changes = describe_changes(rows=list(page.object_list), models=models)

    user_ids: set[int] = set()
    for model in models.values():
        user_ids.update(
            _history_model(model).objects.exclude(history_user=None).values_list("history_user_id", flat=True).distinct()
        )
    users = list(get_user_model().objects.filter(pk__in=user_ids).order_by(get_user_model().USERNAME_FIELD))

    def query(**overrides) -> str:
        params = {"model": selected_model, "user": selected_user, "type": selected_type, **overrides}
        from urllib.parse import urlencode

        return "?" + urlencode({k: v for k, v in params.items() if v})

    filters = [
        (
            "Object type",
            [("All", query(model=""), not selected_model)]
            + [
                (capfirst(m._meta.verbose_name_plural), query(model=k), selected_model == k)
                for k, m in models.items()
            ],
        ),
        (
            "User",
            [("All", query(user=""), not selected_user)]
            + [(u.get_username(), query(user=str(u.pk)), selected_user == str(u.pk)) for u in users],
        ),
        (
            "Change",
            [("All", query(type=""), not selected_type)]
            + [(label, query(type=t), selected_type == t) for t, label in [("+", "Created"), ("~", "Changed"), ("-", "Deleted")]],
        ),
    ]
    context = {
        **admin.site.each_context(request),
        "title": "Configuration changes",
        "subtitle": None,
        "changes": changes,
        "page_obj": page,
        "paginator": paginator,
        "filters": filters,
        "page_query": lambda n: query(p=str(n)),
        "base_query": query(),
        "has_filters": bool(selected_model or selected_user or selected_type),
    }
    context["page_links"] = [
        (n, query(p=str(n)) if n != paginator.ELLIPSIS else None)
        for n in paginator.get_elided_page_range(page.number, on_each_side=2, on_ends=1)
    ]
    request.current_app = admin.site.name
    return TemplateResponse(request, "admin/configuration_changes.html", context)


# --- Circuit breakers (on-call screen) ------------------------------------------------------


BREAKER_TONE = {"closed": "ok", "half-open": "warn", "open": "bad"}
BREAKER_ORDER = {"open": 0, "half-open": 1, "closed": 2}


@dataclass(frozen=True)
class BreakerRow:
    key: str
    base_url: str
    model: str
    state: str
    tone: str
    calls: int
    failures: int
    failure_percent: int | None
    open_until: datetime | None
    seconds_left: int | None
    calls_url: str | None


def breaker_rows(*, now: float | None = None, user=None) -> list[BreakerRow]:
    """Every breaker the gateway has registered, open ones first."""
    import time
    from datetime import timezone as dt_timezone
    from urllib.parse import urlencode

    from conversations.gateway import breaker

    now = now or time.time()
    calls_url = None
    if user is not None and user.has_perm("conversations.view_providercall"):
        calls_url = reverse("admin:conversations_providercall_changelist")
    rows = []
    for b in breaker.states(now=now):
        base_url, _, model = b.key.rpartition("|")
        until = datetime.fromtimestamp(b.open_until, tz=dt_timezone.utc) if b.open_until else None
        rows.append(
            BreakerRow(
                key=b.key,
                base_url=base_url,
                model=model,
                state=b.state,
                tone=BREAKER_TONE.get(b.state, "muted"),
                calls=b.calls,
                failures=b.failures,
                failure_percent=round(100 * b.failures / b.calls) if b.calls else None,
                open_until=until,
                seconds_left=max(0, round(b.open_until - now)) if b.open_until else None,
                calls_url=f"{calls_url}?{urlencode({'model_used': model})}" if calls_url and model else None,
            )
        )
    rows.sort(key=lambda r: (BREAKER_ORDER.get(r.state, 3), r.key))
    return rows


def circuit_breakers_view(request: HttpRequest):
    """Read-only: who may read the call log may see the breakers."""
    from django.conf import settings

    from conversations.gateway import breaker, shared

    if not request.user.has_perm("conversations.view_providercall"):
        raise PermissionDenied
    rows = breaker_rows(user=request.user)
    cfg = settings.GATEWAY["BREAKER"]
    context = {
        **admin.site.each_context(request),
        "title": "Circuit breakers",
        "subtitle": None,
        "breakers": rows,
        "open_count": sum(r.state != "closed" for r in rows),
        "window_s": breaker.BUCKET_S * breaker.WINDOW_BUCKETS,
        "min_calls": cfg["MIN_CALLS"],
        "failure_percent": round(100 * cfg["FAILURE_RATIO"]),
        "open_s": cfg["OPEN_S"],
        "shared_status": shared.status(),
    }
    request.current_app = admin.site.name
    return TemplateResponse(request, "admin/circuit_breakers.html", context)


def _install_audit_url(site: admin.AdminSite) -> None:
    """Add the audit and operations screens to the site's URLs (at
    /admin/audit/... and /admin/ops/...), keeping the site class: no custom
    AdminSite needed for two extra views."""
    if getattr(site, "_configuration_changes_installed", False):
        return
    original = site.get_urls

    def get_urls():
        return [
            path(
                "audit/configuration-changes/",
                site.admin_view(configuration_changes_view),
                name="configuration_changes",
            ),
            path("ops/circuit-breakers/", site.admin_view(circuit_breakers_view), name="circuit_breakers"),
            *original(),
        ]

    site.get_urls = get_urls
    site._configuration_changes_installed = True


_install_audit_url(admin.site)
