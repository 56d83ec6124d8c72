"""The demo/default model catalogue and list prices (USD per 1M tokens).

Used by `quickstart` and tests; managers change prices in admin, where every
version is kept with its author."""

from datetime import datetime, timezone
from decimal import Decimal

from django.db import transaction

from budgets.models import LanguageModel, ModelPrice

DEFAULT_PRICES = {
    # name: (encoding, context window, input, cached input, output)
    "gpt-4o-mini": ("o200k_base", 128_000, "0.15", "0.075", "0.60"),
    "gpt-4o": ("o200k_base", 128_000, "2.50", "1.25", "10.00"),
    "gpt-4.1-mini": ("o200k_base", 1_047_576, "0.40", "0.10", "1.60"),
    "gpt-4.1-nano": ("o200k_base", 1_047_576, "0.10", "0.025", "0.40"),
    "o4-mini": ("o200k_base", 200_000, "1.10", "0.275", "4.40"),
    "gpt-3.5-turbo": ("cl100k_base", 16_385, "0.50", None, "1.50"),
}
PRICES_EFFECTIVE_FROM = datetime(2025, 1, 1, tzinfo=timezone.utc)


@transaction.atomic
def seed_catalogue(*, actor=None) -> int:
    """Create missing catalogue entries and their first price; never
    overwrites a price a manager has set."""
    created = 0
    for name, (encoding, window, inp, cached, out) in DEFAULT_PRICES.items():
        model = LanguageModel.objects.filter(name=name).first()
        if model is None:
            model = LanguageModel(name=name, encoding=encoding, context_window=window)
            model._history_user = actor
            model.save()
            created += 1
        if not model.prices.exists():
            price = ModelPrice(
                model=model,
                effective_from=PRICES_EFFECTIVE_FROM,
                input_per_million=Decimal(inp),
                cached_input_per_million=Decimal(cached) if cached else None,
                output_per_million=Decimal(out),
                note="list price at launch",
            )
            price._history_user = actor
            price.save()
    return created
