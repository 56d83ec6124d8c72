"""Bad budget configuration is refused with a message a manager understands."""

import datetime as dt
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from budgets.models import Budget, DegradationRule, LanguageModel, ModelPrice, StepPolicy
from governance.models import Application


@pytest.fixture
def app(db):
    from budgets.catalogue import seed_catalogue

    seed_catalogue()
    return Application.objects.create(slug="v", name="V", default_model="gpt-4o-mini")


def errors_of(obj) -> dict:
    with pytest.raises(ValidationError) as info:
        obj.full_clean()
    return info.value.message_dict


@pytest.mark.parametrize(
    "fields,field,text",
    [
        ({"warn_at": [80, 50]}, "warn_at", "ascending"),
        ({"warn_at": [50, 50]}, "warn_at", "ascending"),
        ({"warn_at": [0, 120]}, "warn_at", "between 0 and 100"),
        ({"warn_at": "50,80"}, "warn_at", "list of percentages"),
        ({"limit_usd": Decimal("-1")}, "limit_usd", "greater than or equal to 0"),
        ({"limit_usd": None, "limit_tokens": None}, "limit_usd", "Set a limit"),
        ({"timezone": "Mars/Olympus"}, "timezone", "not a time zone"),
        ({"scope": "step"}, "step", "Name the step"),
        ({"scope": "api_key"}, "api_key", "Choose the API key"),
        ({"end_user": "x"}, "end_user", "Only end-user budgets"),
    ],
)
def test_budget_rejects(app, fields, field, text):
    values = {"name": "b", "scope": "application", "application": app, "limit_usd": Decimal("10"), **fields}
    errs = errors_of(Budget(**values))
    assert field in errs and text in " ".join(errs[field])


def test_organisation_budget_cannot_name_an_application(app):
    assert "scope" in errors_of(Budget(name="org", scope="organisation", application=app, limit_usd=1))


def test_ladder_rule_to_unpriced_model_is_refused(app):
    LanguageModel.objects.create(name="shiny-new")
    errs = errors_of(DegradationRule(application=app, threshold_percent=80, switch_to_model="shiny-new"))
    assert "no price in force" in errs["switch_to_model"][0]
    errs = errors_of(DegradationRule(application=app, threshold_percent=80, switch_to_model="nonexistent"))
    assert "not an active model" in errs["switch_to_model"][0]
    model = LanguageModel.objects.get(name="shiny-new")
    ModelPrice.objects.create(model=model, effective_from=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), input_per_million=1, output_per_million=1)
    DegradationRule(application=app, threshold_percent=80, switch_to_model="shiny-new").full_clean()


def test_ladder_rule_must_do_something(app):
    assert "refuse" in errors_of(DegradationRule(application=app, threshold_percent=50))
    assert "threshold_percent" in errors_of(DegradationRule(application=app, threshold_percent=-5, refuse=True))


def test_step_policy_limits(app):
    assert "max_input_tokens" in errors_of(StepPolicy(application=app, step="x", max_input_tokens=3))
