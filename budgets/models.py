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
