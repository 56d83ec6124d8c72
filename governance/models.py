"""Applications (the bots this platform governs) and their API keys."""

import hashlib
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from simple_history.models import HistoricalRecords


def key_fingerprint(secret: str) -> str:
    """Names a stored provider key without revealing it, so history shows
    when it was replaced or removed (the key itself is never historized)."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12] if secret else ""


class ProviderKeyFingerprint(models.Model):
    """A provider_api_key's fingerprint, kept in step on every save (editable
    only so that history diffs show it; no form has it: admin.DERIVED_FIELDS)."""

    provider_key_fingerprint = models.CharField(
        max_length=24, blank=True, help_text="Which provider key is stored, never the key itself."
    )

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        self.provider_key_fingerprint = key_fingerprint(self.provider_api_key)
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "provider_api_key" in update_fields:
            kwargs["update_fields"] = {*update_fields, "provider_key_fingerprint"}
        super().save(*args, **kwargs)


class Application(ProviderKeyFingerprint):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        PILOT = "pilot", "Pilot"
        PRODUCTION = "production", "Production"

    slug = models.SlugField(max_length=60, unique=True)
    name = models.CharField(max_length=120)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    is_active = models.BooleanField(default=True, help_text="A suspended application's keys are refused.")
    default_model = models.CharField(
        max_length=100, help_text="Used when a request names no model. Must be in the model catalogue."
    )
    default_temperature = models.DecimalField(
        max_digits=3,
        decimal_places=2,
        null=True,
        blank=True,
        validators=[MinValueValidator(0), MaxValueValidator(2)],
        help_text="Applied when a request sets none.",
    )
    default_max_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Applied when a request sets no max_tokens."
    )
    system_prompt = models.TextField(
        blank=True, help_text="Used by the native API's server-side conversations."
    )
    polite_refusal_message = models.TextField(
        blank=True,
        default="I'm sorry, I can't help with more questions right now. Please try again later or contact our support team.",
        help_text="What the bot's users see when a budget rule refuses politely.",
    )
    provider_base_url = models.URLField(
        blank=True, help_text="Overrides OPENAI_BASE_URL for this application only."
    )
    provider_api_key = models.CharField(
        max_length=300,
        blank=True,
        help_text="Overrides OPENAI_API_KEY for this application only. Never shown in logs.",
    )
    # --- resilience: deadlines, retries, limits, cache, what users see on failure
    request_deadline_s = models.DecimalField(
        "request deadline (s)", max_digits=6, decimal_places=2, default=Decimal("60"),
        validators=[MinValueValidator(Decimal("0.1"))],
        help_text="Retries and fallbacks never run past this, counted from arrival.",
    )
    connect_timeout_s = models.DecimalField(
        "connect timeout (s)", max_digits=6, decimal_places=2, default=Decimal("5"), validators=[MinValueValidator(Decimal("0.05"))]
    )
    read_timeout_s = models.DecimalField(
        "read timeout (s)", max_digits=6, decimal_places=2, default=Decimal("30"), validators=[MinValueValidator(Decimal("0.05"))],
        help_text="Longest silence from the provider before an attempt is abandoned.",
    )
    max_retries = models.PositiveSmallIntegerField(default=2, validators=[MaxValueValidator(10)], help_text="Per route, on 429/5xx/connection errors.")
    retry_backoff_ms = models.PositiveIntegerField(default=200, help_text="First backoff; doubles per retry, with jitter.")
    retry_backoff_max_ms = models.PositiveIntegerField(default=5000)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="Across all keys; blank: unlimited.")
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="Input + max output, across all keys.")
    response_cache_ttl_s = models.PositiveIntegerField(
        "response cache TTL (s)", default=0, help_text="Exact-match cache of non-streaming answers; 0 turns it off."
    )

    class FailureReply(models.TextChoices):
        ERROR = "error", "An HTTP error with a machine-readable code"
        POLITE = "polite", "The messages below, as an ordinary answer"

    failure_reply = models.CharField(max_length=10, choices=FailureReply.choices, default=FailureReply.ERROR)
    slow_message = models.TextField(
        default="Sorry, this is taking longer than it should. Please try again in a moment.",
        help_text="Shown when the deadline passes.",
    )
    down_message = models.TextField(
        default="Our assistant is unavailable right now. Please try again later or contact support.",
        help_text="Shown when the provider is down (circuit open or every fallback failed).",
    )
    flagged_message = models.TextField(
        default="A reviewer has flagged this answer as possibly wrong. Please double-check it with our support team.",
        help_text="What the bot shows when it learns an answer was flagged.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    history = HistoricalRecords(excluded_fields=["provider_api_key"])

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        from budgets.models import LanguageModel

        if self.default_model and not LanguageModel.objects.filter(name=self.default_model).exists():
            raise ValidationError({"default_model": f"'{self.default_model}' is not in the model catalogue."})


class ApiKey(models.Model):
    """An application key. Only a SHA-256 of the secret is stored; the secret
    is shown once, when the key is created."""

    application = models.ForeignKey(Application, on_delete=models.PROTECT, related_name="api_keys")
    name = models.CharField(max_length=120, blank=True, help_text="What uses this key, e.g. 'web widget'.")
    prefix = models.CharField(max_length=16, db_index=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="Blank: only the application's limit.")
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    history = HistoricalRecords(excluded_fields=["last_used_at"])

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.application.slug})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class FallbackRoute(ProviderKeyFingerprint):
    """Where to go, in order, when the application's primary model fails."""

    application = models.ForeignKey(Application, on_delete=models.CASCADE, related_name="fallbacks")
    position = models.PositiveSmallIntegerField(default=1)
    model = models.CharField(max_length=100, help_text="A catalogued model with a price in force.")
    provider_base_url = models.URLField(blank=True, help_text="Blank: the application's provider.")
    provider_api_key = models.CharField(max_length=300, blank=True)
    history = HistoricalRecords(excluded_fields=["provider_api_key"])

    class Meta:
        ordering = ["application", "position"]

    def __str__(self) -> str:
        return f"{self.application} → {self.model}"

    def clean(self) -> None:
        from budgets.models import LanguageModel
        from budgets.selectors import price_in_force

        model = LanguageModel.objects.filter(name=self.model, is_active=True).first()
        if model is None:
            raise ValidationError({"model": f"'{self.model}' is not an active model in the catalogue."})
        if price_in_force(model=model) is None:
            raise ValidationError({"model": f"'{self.model}' has no price in force; it would be refused."})
