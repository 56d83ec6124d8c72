"""Reads of the model catalogue and the price table."""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Prefetch
from django.utils import timezone

from budgets.models import LanguageModel, ModelPrice


class UnknownModel(LookupError):
    pass


class ModelNotPriced(LookupError):
    pass


@dataclass(frozen=True)
class PricedModel:
    model: LanguageModel
    price: ModelPrice


def price_in_force(*, model: LanguageModel, at: datetime | None = None) -> ModelPrice | None:
    at = at or timezone.now()
    return (
        ModelPrice.objects.filter(model=model, effective_from__lte=at).order_by("-effective_from").first()
    )


def priced_model(*, name: str, at: datetime | None = None) -> PricedModel:
    """The catalogued, active model called `name` and its price in force.

    Raises UnknownModel when the catalogue has no such active model and
    ModelNotPriced when it has one but no price applies at `at`.
    """
    model = LanguageModel.objects.filter(name=name, is_active=True).first()
    if model is None:
        raise UnknownModel(name)
    price = price_in_force(model=model, at=at)
    if price is None:
        raise ModelNotPriced(name)
    return PricedModel(model=model, price=price)


def models_in_service(*, at: datetime | None = None) -> list[PricedModel]:
    """Active models that have a price in force: the ones /v1/models lists."""
    at = at or timezone.now()
    prices = ModelPrice.objects.filter(effective_from__lte=at).order_by("-effective_from")
    out = []
    for model in LanguageModel.objects.filter(is_active=True).prefetch_related(
        Prefetch("prices", queryset=prices, to_attr="prices_in_force")
    ):
        if model.prices_in_force:
            out.append(PricedModel(model=model, price=model.prices_in_force[0]))
    return out


MILLION = Decimal(1_000_000)


def cost_of(*, price: ModelPrice, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
    """Exact USD cost of a call's usage. Cached prompt tokens are a subset of
    prompt tokens and are billed at the cached rate; nothing is rounded."""
    cached = max(0, min(cached_tokens, prompt_tokens))
    uncached = prompt_tokens - cached
    total = (
        Decimal(uncached) * price.input_per_million
        + Decimal(cached) * price.cached_rate
        + Decimal(completion_tokens) * price.output_per_million
    )
    return total / MILLION


MICRO = Decimal("0.000001")


def to_micro_dollars(amount: Decimal) -> Decimal:
    """Round an exact cost for display and reconciliation: to the micro-dollar,
    half away from zero, as invoices round (never banker's rounding)."""
    from decimal import ROUND_HALF_UP

    return amount.quantize(MICRO, rounding=ROUND_HALF_UP)
