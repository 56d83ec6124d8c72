"""Reads for applications and keys."""

from governance.models import ApiKey
from governance.services import KEY_PREFIX, hash_key


class KeyRejected(Exception):
    """Why a presented key was refused; `code` is machine-readable."""

    def __init__(self, code: str, message: str, prefix: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.prefix = prefix


def key_for_secret(*, secret: str | None) -> ApiKey:
    if not secret:
        raise KeyRejected(
            "missing_api_key",
            "No API key provided. Send it as 'Authorization: Bearer <application key>'.",
        )
    prefix = secret[:11] if secret.startswith(KEY_PREFIX) else ""
    key = (
        ApiKey.objects.select_related("application")
        .filter(key_hash=hash_key(secret))
        .first()
    )
    if key is None:
        raise KeyRejected("invalid_api_key", "Incorrect API key provided.", prefix)
    if key.revoked_at is not None:
        raise KeyRejected("revoked_api_key", f"API key {key.prefix}… was revoked.", key.prefix)
    if not key.application.is_active:
        raise KeyRejected(
            "application_suspended",
            f"Application '{key.application.slug}' is suspended.",
            key.prefix,
        )
    return key
