"""An application's traffic: conversations, the messages sent and answered,
and one ProviderCall per request that reached the gateway.

Prompts and answers are append-only. Python refuses updates and deletes here;
on Postgres, triggers make the database itself refuse them (the retention purge
is the one path allowed to bypass them, explicitly).
"""

import pgtrigger
from django.conf import settings
from django.db import models

from governance.models import ApiKey, Application

MONEY = dict(max_digits=24, decimal_places=12)


class AppendOnlyError(Exception):
    pass


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise AppendOnlyError(f"{self.model.__name__} rows are append-only")

    def delete(self):
        raise AppendOnlyError(f"{self.model.__name__} rows are append-only")


class ProviderCallQuerySet(models.QuerySet):
    def delete(self):
        raise AppendOnlyError("Provider calls are never deleted")


class Conversation(models.Model):
    # db_index=False: the (application, external_id) unique index serves application lookups.
    application = models.ForeignKey(Application, on_delete=models.PROTECT, related_name="conversations", db_index=False)
    external_id = models.CharField(
        max_length=128, help_text="The bot's conversation id (X-Conversation-ID), or one the platform made."
    )
    end_user = models.CharField(max_length=128, blank=True)  # indexed below, without a LIKE twin
    title = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField()  # nothing sorts or filters on it; every finish rewrote its index
    last_activity_at = models.DateTimeField(db_index=True)
    # Running totals, maintained with F() updates in the recording service.
    call_count = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveBigIntegerField(default=0)
    total_cost_usd = models.DecimalField(default=0, **MONEY)

    class Meta:
        ordering = ["-last_activity_at"]
        constraints = [
            models.UniqueConstraint(fields=["application", "external_id"], name="conversation_id_per_app"),
        ]
        indexes = [models.Index(fields=["end_user"], name="conversation_end_user_idx")]

    def __str__(self) -> str:
        return self.title or self.external_id


class ProviderCall(models.Model):
    class Status(models.TextChoices):
        IN_PROGRESS = "in_progress", "In progress"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        REFUSED = "refused", "Refused"
        BLOCKED = "blocked", "Blocked"
        CANCELLED = "cancelled", "Cancelled"
        INTERRUPTED = "interrupted", "Interrupted"

    class Outcome(models.TextChoices):
        ANSWERED = "answered", "Answered"
        DEGRADED = "degraded", "Degraded"
        REFUSED = "refused", "Refused"
        BLOCKED = "blocked", "Blocked"
        FAILED = "failed", "Failed"

    request_id = models.CharField(max_length=128)  # indexed below, without a LIKE twin
    # db_index=False: call_app_time_idx (application, -created_at) serves application lookups.
    application = models.ForeignKey(
        Application, null=True, blank=True, on_delete=models.PROTECT, related_name="calls", db_index=False
    )
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="calls")
    key_prefix = models.CharField(max_length=16, blank=True, help_text="Prefix of the key presented, if any.")
    conversation = models.ForeignKey(
        Conversation, null=True, blank=True, on_delete=models.PROTECT, related_name="calls"
    )
    end_user = models.CharField(max_length=128, blank=True)
    step = models.CharField(max_length=64, blank=True)
    endpoint = models.CharField(max_length=64, default="chat.completions")
    stream = models.BooleanField(default=False)
    model_requested = models.CharField(max_length=100, blank=True)
    model_used = models.CharField(max_length=100, blank=True)
    parameters = models.JSONField(default=dict, blank=True, help_text="Request parameters other than messages.")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.IN_PROGRESS)
    outcome = models.CharField(max_length=20, choices=Outcome.choices, blank=True)
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error_type = models.CharField(max_length=64, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    decisions = models.JSONField(default=list, blank=True, help_text="Policy decisions taken, in order.")
    attempts = models.JSONField(default=list, blank=True, help_text="Every provider attempt: route, outcome, latency.")
    estimated_prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    token_count_is_estimate = models.BooleanField(
        default=False, help_text="The pre-flight count used a substitute encoding."
    )
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    cached_tokens = models.PositiveIntegerField(null=True, blank=True)
    reasoning_tokens = models.PositiveIntegerField(null=True, blank=True)
    total_tokens = models.PositiveIntegerField(null=True, blank=True)
    usage_source = models.CharField(
        max_length=12,
        choices=[("provider", "Reported by provider"), ("estimated", "Estimated locally"), ("none", "None")],
        default="none",
    )
    price = models.ForeignKey(
        "budgets.ModelPrice", null=True, blank=True, on_delete=models.PROTECT, related_name="calls"
    )
    cost_usd = models.DecimalField(null=True, blank=True, **MONEY)
    provider_base_url = models.CharField(max_length=300, blank=True)
    provider_response_id = models.CharField(max_length=128, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True)
    latency_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Whole request, as the client saw it.")
    provider_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(db_index=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    objects = ProviderCallQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["application", "-created_at"], name="call_app_time_idx"),
            models.Index(fields=["outcome", "-created_at"], name="call_outcome_time_idx"),
            models.Index(fields=["request_id"], name="call_request_id_idx"),
            models.Index(
                fields=["created_at"],
                name="call_in_progress_idx",
                condition=models.Q(status="in_progress"),
            ),
        ]
        triggers = [
            pgtrigger.Protect(name="calls_never_deleted", operation=pgtrigger.Delete),
            pgtrigger.Protect(
                name="final_calls_immutable",
                operation=pgtrigger.Update,
                condition=pgtrigger.Q(old__status__df="in_progress"),
            ),
        ]

    def __str__(self) -> str:
        return self.request_id


class Message(models.Model):
    """One message as sent to, or answered by, the provider in one call."""

    class Direction(models.TextChoices):
        REQUEST = "request", "Sent"
        RESPONSE = "response", "Answer"

    # db_index=False: message_conv_call_idx (conversation, call) serves conversation lookups.
    conversation = models.ForeignKey(Conversation, on_delete=models.PROTECT, related_name="messages", db_index=False)
    call = models.ForeignKey(ProviderCall, on_delete=models.PROTECT, related_name="messages")
    direction = models.CharField(max_length=10, choices=Direction.choices)
    position = models.PositiveSmallIntegerField(help_text="Index within the call's request (answers: 0).")
    role = models.CharField(max_length=16)
    name = models.CharField(max_length=64, blank=True)
    content = models.TextField(blank=True, help_text="Text content; parts are joined.")
    parts = models.JSONField(null=True, blank=True, help_text="Structured content / tool calls, as sent.")
    content_sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField()

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["call_id", "direction", "position"]
        indexes = [models.Index(fields=["conversation", "call"], name="message_conv_call_idx")]
        triggers = [
            pgtrigger.Protect(name="messages_append_only", operation=pgtrigger.Update | pgtrigger.Delete),
        ]

    def save(self, *args, **kwargs):
        if self.pk is not None and not kwargs.get("force_insert"):
            raise AppendOnlyError("Messages are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AppendOnlyError("Messages are append-only")

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"


class AnswerFlag(models.Model):
    """Someone (a support agent, or the bot on a user's behalf) says an answer
    was wrong. Append-only: reviewers' verdicts are recorded separately."""

    call = models.ForeignKey(ProviderCall, on_delete=models.PROTECT, related_name="flags")
    reason = models.TextField()
    raised_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    raised_by_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        triggers = [pgtrigger.Protect(name="flags_append_only", operation=pgtrigger.Update | pgtrigger.Delete)]

    def __str__(self) -> str:
        return f"flag on {self.call.request_id}"
