"""Periodic upkeep of the call record. Tasks are thin wrappers over services."""

from celery import shared_task

from conversations import services


@shared_task(name="conversations.reap_interrupted_calls", queue="maintenance")
def reap_interrupted_calls() -> int:
    return services.mark_interrupted_calls()
