"""Cost is tokens × price per million, exact to the micro-dollar and beyond,
with cached prompt tokens billed at the cached rate, at the price in force."""

import datetime as dt
from decimal import Decimal

import pytest

from budgets.models import LanguageModel, ModelPrice
from budgets.selectors import ModelNotPriced, UnknownModel, cost_of, priced_model, to_micro_dollars

UTC = dt.timezone.utc


@pytest.fixture
def mini(db):
    model = LanguageModel.objects.create(name="mini", encoding="cl100k_base")
    old = ModelPrice.objects.create(
        model=model, effective_from=dt.datetime(2025, 1, 1, tzinfo=UTC),
        input_per_million=Decimal("0.15"), cached_input_per_million=Decimal("0.075"), output_per_million=Decimal("0.60"),
    )
    new = ModelPrice.objects.create(
        model=model, effective_from=dt.datetime(2026, 6, 1, tzinfo=UTC),
        input_per_million=Decimal("0.20"), cached_input_per_million=None, output_per_million=Decimal("0.80"),
    )
    return model, old, new


def test_cost_to_the_micro_dollar(mini):
    _, old, _ = mini
    cost = cost_of(price=old, prompt_tokens=1234, completion_tokens=567, cached_tokens=1024)
    # (210 × 0.15 + 1024 × 0.075 + 567 × 0.60) / 1e6 = 448.5 / 1e6
    assert cost == Decimal("0.0004485")
    assert to_micro_dollars(cost) == Decimal("0.000449")


def test_single_token_is_not_rounded_to_zero(mini):
    _, old, _ = mini
    assert cost_of(price=old, prompt_tokens=1, completion_tokens=0) == Decimal("0.00000015")


def test_cached_falls_back_to_input_price_when_unset(mini):
    _, _, new = mini
    assert cost_of(price=new, prompt_tokens=1000, completion_tokens=0, cached_tokens=1000) == Decimal("0.0002")


def test_cached_tokens_cannot_exceed_prompt_tokens(mini):
    _, old, _ = mini
    assert cost_of(price=old, prompt_tokens=100, completion_tokens=0, cached_tokens=500) == cost_of(
        price=old, prompt_tokens=100, completion_tokens=0, cached_tokens=100
    )


def test_price_in_force_follows_effective_date(mini):
    model, old, new = mini
    assert priced_model(name="mini", at=dt.datetime(2026, 5, 31, 23, 59, tzinfo=UTC)).price == old
    assert priced_model(name="mini", at=dt.datetime(2026, 6, 1, tzinfo=UTC)).price == new
    with pytest.raises(ModelNotPriced):
        priced_model(name="mini", at=dt.datetime(2024, 12, 31, tzinfo=UTC))
    with pytest.raises(UnknownModel):
        priced_model(name="nope")
    model.is_active = False
    model.save()
    with pytest.raises(UnknownModel):
        priced_model(name="mini")


def test_stored_cost_keeps_every_digit(mini, db):
    from conversations.models import ProviderCall

    _, old, _ = mini
    cost = cost_of(price=old, prompt_tokens=7, completion_tokens=3, cached_tokens=0)
    call = ProviderCall.objects.create(request_id="r", status="succeeded", cost_usd=cost, created_at=dt.datetime.now(UTC))
    call.refresh_from_db()
    assert call.cost_usd == Decimal("0.00000285")
