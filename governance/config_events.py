"""Tell the gateway's per-process configuration cache that configuration
changed. Cache invalidation only: no business rule lives here."""

from django.db.models.signals import post_delete, post_save


def _changed(sender, **kwargs) -> None:
    from conversations.gateway import config_cache

    config_cache.changed()


def connect() -> None:
    from budgets.models import Budget, DegradationRule, LanguageModel, ModelPrice, StepPolicy
    from governance.models import ApiKey, Application, FallbackRoute

    for model in (ApiKey, Application, FallbackRoute, LanguageModel, ModelPrice, Budget, DegradationRule, StepPolicy):
        post_save.connect(_changed, sender=model, dispatch_uid=f"config-changed-save-{model.__name__}")
        post_delete.connect(_changed, sender=model, dispatch_uid=f"config-changed-delete-{model.__name__}")
