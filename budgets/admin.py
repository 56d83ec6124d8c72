"""Admin for the model catalogue and its price table. Every change keeps a
history record with the acting user (simple_history: HistoryRequestMiddleware
supplies the user for admin saves, inline ones included)."""

from django.contrib import admin, messages
from django.utils.safestring import mark_safe

from budgets.models import LanguageModel, ModelPrice
from budgets.selectors import price_in_force
from governance.admin import HistoryAdmin, usd


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
