"""The model catalogue and its price table.

Prices are per million tokens and versioned by an effective-from instant: the
price in force for a call is the newest version that had started when the call
began. A catalogued model with no version in force is refused, never free.
"""

from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from simple_history.models import HistoricalRecords

PRICE_FIELD = dict(max_digits=12, decimal_places=6, validators=[MinValueValidator(Decimal("0"))])


class LanguageModel(models.Model):
    name = models.CharField(
        max_length=100, unique=True, help_text="The model name clients ask for, e.g. gpt-4o-mini."
    )
    upstream_name = models.CharField(
        max_length=100, blank=True, help_text="Name sent to the provider, if different."
    )
    encoding = models.CharField(
        max_length=50,
        default="cl100k_base",
        help_text="tiktoken encoding for pre-flight counts; a missing one is replaced by the "
        "nearest available and the count marked as an estimate.",
    )
    context_window = models.PositiveIntegerField(default=128_000)
    is_active = models.BooleanField(default=True, help_text="Inactive models are refused.")
    created_at = models.DateTimeField(auto_now_add=True)
    history = HistoricalRecords()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def provider_model(self) -> str:
        return self.upstream_name or self.name


class ModelPrice(models.Model):
    model = models.ForeignKey(LanguageModel, on_delete=models.PROTECT, related_name="prices")
    effective_from = models.DateTimeField(help_text="The price applies to calls that start at or after this instant.")
    input_per_million = models.DecimalField("input $ / 1M tokens", **PRICE_FIELD)
    cached_input_per_million = models.DecimalField(
        "cached input $ / 1M tokens",
        null=True,
        blank=True,
        help_text="Empty means cached input is billed at the input price.",
        **PRICE_FIELD,
    )
    output_per_million = models.DecimalField("output $ / 1M tokens", **PRICE_FIELD)
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    history = HistoricalRecords()

    class Meta:
        ordering = ["model__name", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["model", "effective_from"], name="one_price_per_model_instant"),
        ]
        indexes = [models.Index(fields=["model", "-effective_from"], name="price_in_force_idx")]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d %H:%M}"

    def clean(self) -> None:
        if (
            self.cached_input_per_million is not None
            and self.input_per_million is not None
            and self.cached_input_per_million > self.input_per_million
        ):
            raise ValidationError(
                {"cached_input_per_million": "Cached input cannot cost more than uncached input."}
            )

    @property
    def cached_rate(self) -> Decimal:
        if self.cached_input_per_million is None:
            return self.input_per_million
        return self.cached_input_per_million


# --- Budgets ---------------------------------------------------------------

MONEY = dict(max_digits=24, decimal_places=12)


def _valid_timezone(value: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"'{value}' is not a time zone name such as 'Europe/Paris' or 'UTC'.") from None


def _default_warnings() -> list[int]:
    return [50, 80, 95]


class Budget(models.Model):
    """A spending limit over a scope and a period. Spend is accounted per
    period (BudgetPeriod), so a new period starts from zero without a reset job."""

    class Scope(models.TextChoices):
        ORGANISATION = "organisation", "Whole organisation"
        APPLICATION = "application", "Application"
        API_KEY = "api_key", "One API key"
        END_USER = "end_user", "End user"
        STEP = "step", "Pipeline step of an application"

    class Period(models.TextChoices):
        DAY = "day", "Day"
        WEEK = "week", "Week (from Monday)"
        MONTH = "month", "Month"
        NONE = "none", "No period (lifetime)"

    name = models.CharField(max_length=120)
    scope = models.CharField(max_length=20, choices=Scope.choices)
    application = models.ForeignKey(
        "governance.Application", null=True, blank=True, on_delete=models.PROTECT, related_name="budgets"
    )
    api_key = models.ForeignKey(
        "governance.ApiKey", null=True, blank=True, on_delete=models.PROTECT, related_name="budgets"
    )
    end_user = models.CharField(
        max_length=128, blank=True, help_text="For an end-user budget: that user's id, or blank for each end user separately."
    )
    step = models.CharField(max_length=64, blank=True, help_text="For a step budget: the X-Step name, e.g. 'answer'.")
    period = models.CharField(max_length=10, choices=Period.choices, default=Period.MONTH)
    timezone = models.CharField(max_length=64, default="UTC", validators=[_valid_timezone])
    limit_usd = models.DecimalField(
        "limit (USD)", max_digits=14, decimal_places=6, null=True, blank=True, validators=[MinValueValidator(Decimal("0"))]
    )
    limit_tokens = models.PositiveBigIntegerField("limit (tokens)", null=True, blank=True)
    warn_at = models.JSONField(
        "warning thresholds (%)", default=_default_warnings, blank=True, help_text="Ascending percentages, e.g. [50, 80, 95]."
    )
    hard_cap = models.BooleanField(
        default=True, help_text="Refuse requests whose worst-case cost would pass the limit. Off: warn only."
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    history = HistoricalRecords()

    class Meta:
        ordering = ["scope", "name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        if self.limit_usd is None and self.limit_tokens is None:
            errors["limit_usd"] = "Set a limit in USD, in tokens, or both."
        warn = self.warn_at or []
        if not isinstance(warn, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in warn):
            errors["warn_at"] = "Warning thresholds must be a list of percentages, e.g. [50, 80, 95]."
        elif any(not 0 < x < 100 for x in warn):
            errors["warn_at"] = "Each warning threshold must be between 0 and 100 (exclusive)."
        elif list(warn) != sorted(set(warn)):
            errors["warn_at"] = "Warning thresholds must be in ascending order without repeats."
        needs_app = self.scope in (self.Scope.APPLICATION, self.Scope.END_USER, self.Scope.STEP)
        if needs_app and self.application_id is None:
            errors["application"] = f"A {self.get_scope_display().lower()} budget needs an application."
        if self.scope == self.Scope.ORGANISATION and (self.application_id or self.api_key_id):
            errors["scope"] = "An organisation budget covers everything: leave application and key empty."
        if self.scope == self.Scope.API_KEY and self.api_key_id is None:
            errors["api_key"] = "Choose the API key this budget limits."
        if self.scope == self.Scope.STEP and not self.step:
            errors["step"] = "Name the step (the X-Step header value)."
        if self.scope != self.Scope.STEP and self.step:
            errors["step"] = "Only step budgets name a step."
        if self.scope != self.Scope.END_USER and self.end_user:
            errors["end_user"] = "Only end-user budgets name an end user."
        if errors:
            raise ValidationError(errors)


class BudgetPeriod(models.Model):
    """Spend and holds of one budget in one period (and, for per-end-user
    budgets, for one end user). The row locked when reserving."""

    budget = models.ForeignKey(Budget, on_delete=models.PROTECT, related_name="periods")
    subject = models.CharField(max_length=128, blank=True, help_text="The end user, for per-end-user budgets.")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField(null=True, blank=True)
    spent_usd = models.DecimalField(default=0, **MONEY)
    reserved_usd = models.DecimalField(default=0, **MONEY)
    spent_tokens = models.BigIntegerField(default=0)
    reserved_tokens = models.BigIntegerField(default=0)
    warned_at_percent = models.PositiveSmallIntegerField(default=0, help_text="Highest warning threshold already raised.")

    class Meta:
        ordering = ["-period_start"]
        constraints = [
            models.UniqueConstraint(fields=["budget", "subject", "period_start"], name="one_row_per_budget_period"),
        ]

    def __str__(self) -> str:
        return f"{self.budget} from {self.period_start:%Y-%m-%d %H:%M}"


class Reservation(models.Model):
    """Worst-case cost held against one budget period for one call, settled
    to the actual cost afterwards, released on failure, expired if abandoned."""

    class Status(models.TextChoices):
        HELD = "held", "Held"
        SETTLED = "settled", "Settled"
        RELEASED = "released", "Released"
        EXPIRED = "expired", "Expired"

    call = models.ForeignKey("conversations.ProviderCall", on_delete=models.PROTECT, related_name="reservations")
    # db_index=False: reservation_period_closed_idx (budget_period, closed_at) serves period lookups.
    budget_period = models.ForeignKey(BudgetPeriod, on_delete=models.PROTECT, related_name="reservations", db_index=False)
    amount_usd = models.DecimalField(**MONEY)
    tokens = models.BigIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.HELD)
    settled_usd = models.DecimalField(null=True, blank=True, **MONEY)
    settled_tokens = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["expires_at"], name="held_reservation_expiry_idx", condition=models.Q(status="held")),
            models.Index(fields=["budget_period", "closed_at"], name="reservation_period_closed_idx"),
        ]


# --- Degradation and step policies ----------------------------------------


class DegradationRule(models.Model):
    """One rung of an application's ladder. Every rule whose threshold the
    budget utilisation has reached applies, in order; a refusal ends the ladder."""

    class RefusalMode(models.TextChoices):
        ERROR = "error", "HTTP 429 budget_exceeded"
        POLITE = "polite", "The application's polite reply"

    application = models.ForeignKey("governance.Application", on_delete=models.CASCADE, related_name="degradation_rules")
    position = models.PositiveSmallIntegerField(default=0)
    budget = models.ForeignKey(
        Budget, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="Whose utilisation triggers the rule; blank: the most used budget that applies to the request.",
    )
    threshold_percent = models.DecimalField(max_digits=5, decimal_places=2, validators=[MinValueValidator(0)])
    switch_to_model = models.CharField(max_length=100, blank=True, help_text="Use this (cheaper) model instead.")
    max_tokens_cap = models.PositiveIntegerField(null=True, blank=True, help_text="Cap max_tokens at this.")
    keep_last_turns = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Keep system messages and only the last N other messages."
    )
    refuse = models.BooleanField(default=False)
    refusal_mode = models.CharField(max_length=10, choices=RefusalMode.choices, default=RefusalMode.ERROR)
    history = HistoricalRecords()

    class Meta:
        ordering = ["application", "threshold_percent", "position"]

    def __str__(self) -> str:
        return f"{self.application} ≥ {self.threshold_percent}%"

    def clean(self) -> None:
        from budgets.selectors import price_in_force

        errors = {}
        if not (self.switch_to_model or self.max_tokens_cap or self.keep_last_turns or self.refuse):
            errors["refuse"] = "A rule must do something: switch model, cap max_tokens, keep last turns, or refuse."
        if self.threshold_percent is not None and self.threshold_percent > 1000:
            errors["threshold_percent"] = "Threshold is a percentage of the budget (0-1000)."
        if self.switch_to_model:
            model = LanguageModel.objects.filter(name=self.switch_to_model, is_active=True).first()
            if model is None:
                errors["switch_to_model"] = f"'{self.switch_to_model}' is not an active model in the catalogue."
            elif price_in_force(model=model) is None:
                errors["switch_to_model"] = f"'{self.switch_to_model}' has no price in force; calls to it would be refused."
        if self.max_tokens_cap == 0:
            errors["max_tokens_cap"] = "The cap must be at least 1."
        if self.keep_last_turns == 0:
            errors["keep_last_turns"] = "Keep at least one turn."
        if errors:
            raise ValidationError(errors)


class StepPolicy(models.Model):
    """Input/output caps for one step of an application (blank step: the
    application's default for requests that name none or an unlisted one)."""

    class Oversize(models.TextChoices):
        TRUNCATE_OLDEST = "truncate_oldest", "Drop oldest turns, then shorten the longest message"
        TRUNCATE_MIDDLE = "truncate_middle", "Shorten the longest message in the middle"
        REFUSE = "refuse", "Refuse the request"

    application = models.ForeignKey("governance.Application", on_delete=models.CASCADE, related_name="step_policies")
    step = models.CharField(max_length=64, blank=True)
    max_input_tokens = models.PositiveIntegerField(null=True, blank=True)
    max_output_tokens = models.PositiveIntegerField(null=True, blank=True)
    oversize = models.CharField(max_length=20, choices=Oversize.choices, default=Oversize.TRUNCATE_OLDEST)
    history = HistoricalRecords()

    class Meta:
        verbose_name_plural = "step policies"
        constraints = [models.UniqueConstraint(fields=["application", "step"], name="one_policy_per_step")]

    def __str__(self) -> str:
        return f"{self.application}:{self.step or '(default)'}"

    def clean(self) -> None:
        if self.max_input_tokens is not None and self.max_input_tokens < 16:
            raise ValidationError({"max_input_tokens": "Allow at least 16 input tokens."})
        if self.max_output_tokens == 0:
            raise ValidationError({"max_output_tokens": "Allow at least 1 output token."})


# --- Cost regression ---------------------------------------------------------


class CostRegressionRule(models.Model):
    class Metric(models.TextChoices):
        PER_CALL = "per_call", "Cost per call"
        PER_CONVERSATION = "per_conversation", "Cost per conversation"

    application = models.ForeignKey("governance.Application", on_delete=models.CASCADE, related_name="cost_rules")
    metric = models.CharField(max_length=20, choices=Metric.choices, default=Metric.PER_CALL)
    recent_hours = models.PositiveIntegerField(default=24)
    baseline_days = models.PositiveIntegerField(default=7, help_text="The baseline window ends where the recent one starts.")
    max_ratio = models.DecimalField(
        max_digits=6, decimal_places=2, default=Decimal("1.5"), validators=[MinValueValidator(Decimal("1"))],
        help_text="Raise an event when recent / baseline exceeds this.",
    )
    min_samples = models.PositiveIntegerField(default=20, help_text="Ignore windows with fewer calls or conversations.")
    is_active = models.BooleanField(default=True)
    history = HistoricalRecords()

    def __str__(self) -> str:
        return f"{self.application}: {self.get_metric_display()} > ×{self.max_ratio}"


class CostEvent(models.Model):
    """A budget warning or a cost regression, for the alerting issue to page on."""

    class Kind(models.TextChoices):
        BUDGET_WARNING = "budget_warning", "Budget warning threshold reached"
        COST_REGRESSION = "cost_regression", "Cost regression"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    application = models.ForeignKey("governance.Application", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    # PROTECT: deleting a budget or rule must never erase the events it raised.
    budget = models.ForeignKey(Budget, null=True, blank=True, on_delete=models.PROTECT, related_name="events")
    rule = models.ForeignKey(CostRegressionRule, null=True, blank=True, on_delete=models.PROTECT, related_name="events")
    message = models.CharField(max_length=300)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.message
