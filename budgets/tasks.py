"""Budget upkeep on Celery beat. Thin wrappers over services."""

from celery import shared_task

from budgets import regression, services


@shared_task(name="budgets.expire_reservations")
def expire_reservations() -> int:
    return services.expire_stale_reservations()


@shared_task(name="budgets.detect_cost_regressions")
def detect_cost_regressions() -> int:
    return regression.detect_all()
