"""Read-only admin over an application's traffic, for auditors, reviewers and
support agents: conversations (shown as a timeline of provider calls) and
every provider call, failed and refused ones included.

Nothing here can be added, changed or deleted through the admin, by anyone,
superusers included: prompts and answers are append-only, and provider calls
are a record of what happened. Messages appear only inside a call or a
conversation, never as a list of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.text import Truncator

from budgets.models import LanguageModel
from conversations.models import Conversation, Message, ProviderCall
from conversations.selectors import (
    COST_BUCKETS,
    TimelineEntry,
    conversation_timeline,
    conversations_in_cost_bucket,
    conversations_with_calls,
    search_conversations,
)
from governance.admin import (
    ReadOnlyAdminMixin,
    RequestAwareAdmin,
    admin_link,
    can_view,
    count,
    milliseconds,
    usd,
    when,
)

OUTCOME_TONE = {
    "answered": "ok",
    "degraded": "warn",
    "refused": "bad",
    "blocked": "bad",
    "failed": "bad",
}
STATUS_TONE = {
    "succeeded": "ok",
    "in_progress": "info",
    "failed": "bad",
    "refused": "bad",
    "blocked": "bad",
    "cancelled": "muted",
    "interrupted": "warn",
}


def badge(value: str, label: str, tone: str) -> str:
    if not value:
        return "—"
    return format_html('<span class="gov-badge gov-{}">{}</span>', tone, label)


def outcome_badge(call: ProviderCall) -> str:
    return badge(call.outcome, call.get_outcome_display(), OUTCOME_TONE.get(call.outcome, "muted"))


def status_badge(call: ProviderCall) -> str:
    return badge(call.status, call.get_status_display(), STATUS_TONE.get(call.status, "muted"))


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def decisions_text(decisions: Any) -> str:
    """One decision per line, as compact JSON when it fits on a line and
    indented when it does not: readable without a page of brackets."""
    if not isinstance(decisions, list):
        return pretty_json(decisions)
    lines = []
    for decision in decisions:
        compact = json.dumps(decision, ensure_ascii=False, default=str)
        lines.append(compact if len(compact) <= 110 else pretty_json(decision))
    return "\n".join(lines)


# Status the outcome already implies; the timeline shows the status badge only otherwise.
IMPLIED_STATUS = {
    "answered": "succeeded",
    "degraded": "succeeded",
    "failed": "failed",
    "refused": "refused",
    "blocked": "blocked",
}


def token_triple(call: ProviderCall) -> str:
    """prompt / cached / completion."""
    if call.prompt_tokens is None and call.completion_tokens is None:
        if call.estimated_prompt_tokens is not None:
            return f"~{call.estimated_prompt_tokens:,} / — / — (estimate)"
        return "—"
    return f"{count(call.prompt_tokens)} / {count(call.cached_tokens or 0)} / {count(call.completion_tokens)}"


def model_route(call: ProviderCall) -> str:
    if call.model_used and call.model_requested and call.model_used != call.model_requested:
        return f"{call.model_requested} → {call.model_used}"
    return call.model_used or call.model_requested or "—"


# --- List filters ---------------------------------------------------------------------------


class CatalogueModelFilter(admin.SimpleListFilter):
    """Choices come from the model catalogue (small, indexed), not from a
    DISTINCT over the calls table (large)."""

    title = "model used"
    parameter_name = "model_used"

    def lookups(self, request, model_admin):
        return [(n, n) for n in LanguageModel.objects.order_by("name").values_list("name", flat=True)]


class ConversationModelFilter(CatalogueModelFilter):
    def queryset(self, request, queryset):
        if self.value():
            return conversations_with_calls(queryset=queryset, model_used=self.value())
        return queryset


class CallModelFilter(CatalogueModelFilter):
    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(model_used=self.value())
        return queryset


class ConversationOutcomeFilter(admin.SimpleListFilter):
    title = "outcome (any call)"
    parameter_name = "outcome"

    def lookups(self, request, model_admin):
        return ProviderCall.Outcome.choices

    def queryset(self, request, queryset):
        if self.value():
            return conversations_with_calls(queryset=queryset, outcome=self.value())
        return queryset


class CostFilter(admin.SimpleListFilter):
    title = "cost"
    parameter_name = "cost"

    def lookups(self, request, model_admin):
        return [(key, label) for key, (label, _, _) in COST_BUCKETS.items()]

    def queryset(self, request, queryset):
        if self.value():
            return conversations_in_cost_bucket(queryset=queryset, bucket=self.value())
        return queryset


class TextInputFilter(admin.SimpleListFilter):
    """A filter rendered as a text box (exact match), for fields with too
    many distinct values to list, such as end users."""

    template = "admin/input_filter.html"
    field_name = ""

    def lookups(self, request, model_admin):
        return [("", "")]  # a placeholder: the template renders an input instead

    def has_output(self):
        return True

    def queryset(self, request, queryset):
        value = (self.value() or "").strip()
        return queryset.filter(**{self.field_name: value}) if value else queryset

    def get_facet_counts(self, pk_attname, filtered_qs):
        return {}

    def choices(self, changelist):
        yield {
            "selected": not self.value(),
            "query_string": changelist.get_query_string(remove=[self.parameter_name]),
            "display": "All",
            "value": self.value() or "",
            "parameter_name": self.parameter_name,
            "hidden": [(k, v) for k, v in changelist.params.items() if k != self.parameter_name],
        }


class EndUserFilter(TextInputFilter):
    title = "end user"
    parameter_name = "end_user"
    field_name = "end_user"


# --- Conversations --------------------------------------------------------------------------


@dataclass(frozen=True)
class CallCard:
    """What the timeline template shows for one call, formatted."""

    entry: TimelineEntry
    number: int
    call_url: str
    model_route: str
    status_badge: str
    outcome_badge: str
    tokens: str
    cost: str
    latency: str
    decisions_json: str
    attempts_json: str = ""

    @property
    def call(self) -> ProviderCall:
        return self.entry.call


def _with_parts_json(messages: list[Message]) -> list[Message]:
    for m in messages:
        m.parts_json = pretty_json(m.parts) if m.parts else ""
    return messages


def call_cards(*, timeline: list[TimelineEntry]) -> list[CallCard]:
    cards = []
    for number, entry in enumerate(timeline, start=1):
        call = entry.call
        _with_parts_json(entry.request_messages)
        _with_parts_json(entry.answers)
        cards.append(
            CallCard(
                entry=entry,
                number=number,
                call_url=reverse("admin:conversations_providercall_change", args=[call.pk]),
                model_route=model_route(call),
                status_badge="" if IMPLIED_STATUS.get(call.outcome) == call.status else status_badge(call),
                outcome_badge=outcome_badge(call),
                tokens=token_triple(call),
                cost=usd(call.cost_usd),
                latency=milliseconds(call.latency_ms),
                decisions_json=decisions_text(call.decisions) if call.decisions else "",
                attempts_json=decisions_text(call.attempts) if len(call.attempts or []) > 1 else "",
            )
        )
    return cards


@admin.register(Conversation)
class ConversationAdmin(ReadOnlyAdminMixin, RequestAwareAdmin):
    list_display = [
        "conversation",
        "application_link",
        "end_user_link",
        "calls",
        "tokens",
        "cost",
        "last_activity",
    ]
    list_display_links = ["conversation"]
    list_filter = ["application", ConversationModelFilter, ConversationOutcomeFilter, EndUserFilter, CostFilter]
    date_hierarchy = "last_activity_at"
    # The search box itself is get_search_results below; this only enables it.
    search_fields = ["external_id"]
    search_help_text = "A request id (exact), or text in a title, an end user or any message."
    list_select_related = ["application"]
    list_per_page = 50
    show_full_result_count = False  # no COUNT(*) over the whole table on every search
    ordering = ["-last_activity_at"]
    change_form_template = "admin/conversations/conversation/change_form.html"
    fieldsets = [
        (
            None,
            {
                "fields": [
                    ("application_link", "external_id"),
                    ("title", "end_user_link"),
                    ("started_at", "last_activity_at"),
                    ("call_count", "tokens", "cost"),
                    "calls_link",
                ]
            },
        ),
    ]
    readonly_fields = ["application_link", "end_user_link", "tokens", "cost", "calls_link"]

    def get_search_results(self, request, queryset, search_term):
        return search_conversations(queryset=queryset, term=search_term), False

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        obj = self.get_object(request, object_id)
        if obj is not None and self.has_view_permission(request, obj):
            extra_context["timeline"] = call_cards(timeline=conversation_timeline(conversation=obj))
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="Conversation", ordering="external_id")
    def conversation(self, obj: Conversation) -> str:
        if obj.title:
            return format_html(
                '<span class="gov-conv-title">{}</span><span class="gov-quiet">{}</span>',
                Truncator(obj.title).chars(90),
                obj.external_id,
            )
        return obj.external_id

    @admin.display(description="Calls", ordering="call_count")
    def calls(self, obj: Conversation) -> str:
        return count(obj.call_count)

    @admin.display(description="Last activity", ordering="last_activity_at")
    def last_activity(self, obj: Conversation) -> str:
        return when(obj.last_activity_at)

    @admin.display(description="Application", ordering="application__slug")
    def application_link(self, obj: Conversation) -> str:
        return admin_link(obj.application)

    @admin.display(description="End user", ordering="end_user")
    def end_user_link(self, obj: Conversation) -> str:
        if not obj.end_user:
            return "—"
        url = reverse("admin:conversations_conversation_changelist") + "?" + urlencode({"end_user": obj.end_user})
        return format_html('<a href="{}" title="All conversations of this end user">{}</a>', url, obj.end_user)

    @admin.display(description="Tokens", ordering="total_tokens")
    def tokens(self, obj: Conversation) -> str:
        return count(obj.total_tokens)

    @admin.display(description="Cost", ordering="total_cost_usd")
    def cost(self, obj: Conversation) -> str:
        return usd(obj.total_cost_usd)

    @admin.display(description="Calls")
    def calls_link(self, obj: Conversation) -> str:
        url = reverse("admin:conversations_providercall_changelist") + "?" + urlencode(
            {"conversation__id__exact": obj.pk}
        )
        return format_html('<a href="{}">All calls of this conversation in the call log</a>', url)


# --- Provider calls -------------------------------------------------------------------------


class MessageInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Message
    fields = ["direction_badge", "position", "role", "name", "content_display", "created_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["direction", "position"]
    verbose_name = "message"
    verbose_name_plural = "Messages (sent, then the answer)"

    @admin.display(description="Direction")
    def direction_badge(self, obj: Message) -> str:
        if obj.direction == Message.Direction.RESPONSE:
            return badge(obj.direction, "answer", "ok")
        return badge(obj.direction, "sent", "muted")

    @admin.display(description="Content")
    def content_display(self, obj: Message) -> str:
        parts = pretty_json(obj.parts) if obj.parts else ""
        return format_html(
            '<div class="gov-msg-text">{}</div>{}',
            obj.content,
            format_html('<pre class="gov-json">{}</pre>', parts) if parts else "",
        )


@admin.register(ProviderCall)
class ProviderCallAdmin(ReadOnlyAdminMixin, RequestAwareAdmin):
    list_display = [
        "request_id",
        "created",
        "application_link",
        "model_display",
        "outcome_display",
        "tokens",
        "cost",
        "latency",
        "http_status",
        "error_code",
    ]
    list_filter = ["application", "status", "outcome", CallModelFilter, "stream"]
    date_hierarchy = "created_at"
    search_fields = ["request_id__exact"]  # case-sensitive, so the index answers it
    search_help_text = "A request id (exact)."
    list_select_related = ["application"]
    list_per_page = 50
    show_full_result_count = False
    ordering = ["-created_at"]
    inlines = [MessageInline]
    fieldsets = [
        (
            "Request",
            {
                "fields": [
                    ("request_id", "created_at", "completed_at"),
                    ("application_link", "conversation_link"),
                    ("api_key_link", "key_prefix"),
                    ("end_user", "step", "endpoint", "stream"),
                ]
            },
        ),
        (
            "Outcome",
            {
                "fields": [
                    ("status_display", "outcome_display", "http_status"),
                    ("error_type", "error_code"),
                    "error_message",
                    "decisions_display",
                    "attempts_display",
                ]
            },
        ),
        (
            "Model and usage",
            {
                "fields": [
                    ("model_requested", "model_used"),
                    ("price_link", "cost"),
                    ("tokens", "total_tokens", "reasoning_tokens"),
                    ("estimated_prompt_tokens", "token_count_is_estimate", "usage_source"),
                    ("latency", "provider_latency"),
                    ("finish_reason", "provider_response_id"),
                    "provider_base_url",
                    "parameters_display",
                ]
            },
        ),
    ]
    readonly_fields = [
        "application_link",
        "conversation_link",
        "api_key_link",
        "status_display",
        "outcome_display",
        "decisions_display",
        "attempts_display",
        "price_link",
        "cost",
        "tokens",
        "latency",
        "provider_latency",
        "parameters_display",
    ]

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        match = request.resolver_match
        if match and (match.url_name or "").endswith("_change"):
            qs = qs.select_related("application", "conversation", "api_key__application", "price__model")
        return qs

    @admin.display(description="Application", ordering="application__slug")
    def application_link(self, obj: ProviderCall) -> str:
        return admin_link(obj.application)

    @admin.display(description="Conversation")
    def conversation_link(self, obj: ProviderCall) -> str:
        if obj.conversation_id is None:
            return "—"
        if not can_view(obj.conversation):
            return obj.conversation.external_id  # the title would reveal the first message
        url = reverse("admin:conversations_conversation_change", args=[obj.conversation_id])
        return format_html(
            '<a href="{}">{}</a> (<a href="{}#call-{}">this call in the timeline</a>)',
            url,
            obj.conversation,
            url,
            obj.pk,
        )

    @admin.display(description="API key")
    def api_key_link(self, obj: ProviderCall) -> str:
        return admin_link(obj.api_key)

    @admin.display(description="Price version")
    def price_link(self, obj: ProviderCall) -> str:
        return admin_link(obj.price)

    @admin.display(description="Time", ordering="created_at")
    def created(self, obj: ProviderCall) -> str:
        return when(obj.created_at)

    # Not "model": that name is the ModelAdmin's model class.
    @admin.display(description="Model", ordering="model_used")
    def model_display(self, obj: ProviderCall) -> str:
        return model_route(obj)

    @admin.display(description="Status", ordering="status")
    def status_display(self, obj: ProviderCall) -> str:
        return status_badge(obj)

    @admin.display(description="Outcome", ordering="outcome")
    def outcome_display(self, obj: ProviderCall) -> str:
        return outcome_badge(obj)

    @admin.display(description="Tokens in / cached / out")
    def tokens(self, obj: ProviderCall) -> str:
        return token_triple(obj)

    @admin.display(description="Cost", ordering="cost_usd")
    def cost(self, obj: ProviderCall) -> str:
        return usd(obj.cost_usd)

    @admin.display(description="Latency", ordering="latency_ms")
    def latency(self, obj: ProviderCall) -> str:
        return milliseconds(obj.latency_ms)

    @admin.display(description="Provider latency")
    def provider_latency(self, obj: ProviderCall) -> str:
        return milliseconds(obj.provider_latency_ms)

    @admin.display(description="Decisions")
    def decisions_display(self, obj: ProviderCall) -> str:
        if not obj.decisions:
            return "—"
        return format_html('<pre class="gov-json">{}</pre>', pretty_json(obj.decisions))

    @admin.display(description="Provider attempts")
    def attempts_display(self, obj: ProviderCall) -> str:
        if not obj.attempts:
            return "—"
        return format_html('<pre class="gov-json">{}</pre>', decisions_text(obj.attempts))

    @admin.display(description="Parameters")
    def parameters_display(self, obj: ProviderCall) -> str:
        if not obj.parameters:
            return "—"
        return format_html('<pre class="gov-json">{}</pre>', pretty_json(obj.parameters))
