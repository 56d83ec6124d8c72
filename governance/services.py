"""Writes for applications and keys. Every service takes the acting user
explicitly so history records who did it, even from a command or a task."""

import hashlib
import secrets
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from governance.models import ApiKey, Application

KEY_PREFIX = "gk-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str  # shown once, never stored


@transaction.atomic
def create_api_key(*, application: Application, name: str = "", actor=None) -> IssuedKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        application=application,
        name=name,
        prefix=secret[:11],
        key_hash=hash_key(secret),
        created_by=actor,
    )
    key._history_user = actor
    key.save()
    return IssuedKey(api_key=key, secret=secret)


@transaction.atomic
def revoke_api_key(*, api_key: ApiKey, actor=None) -> ApiKey:
    key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key._history_user = actor
        key.save(update_fields=["revoked_at"])
    return key


def touch_key(*, api_key_id: int, resolution_s: int) -> None:
    """Record last use at most once per `resolution_s`: a conditional update,
    so a hot key costs one cheap UPDATE a minute, not one per request.
    Deliberately skips history: last use is telemetry, not configuration."""
    now = timezone.now()
    cutoff = now - timezone.timedelta(seconds=resolution_s)
    from django.db.models import Q

    ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=cutoff), pk=api_key_id).update(
        last_used_at=now
    )


class KeyRevoked(Exception):
    pass


@transaction.atomic
def set_api_key_limits(
    *, api_key: ApiKey, requests_per_minute: int | None, tokens_per_minute: int | None, actor=None
) -> ApiKey:
    """Change a live key's rate limits, on the row as it is now (a concurrent
    revoke wins: a revoked key is never touched again)."""
    current = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if current.revoked_at is not None:
        raise KeyRevoked(f"API key {current.prefix}… is revoked.")
    current.requests_per_minute = requests_per_minute
    current.tokens_per_minute = tokens_per_minute
    current._history_user = actor
    current.save(update_fields=["requests_per_minute", "tokens_per_minute"])
    return current
