"""Calls left open by a crashed process are closed as interrupted, by a real
Celery worker when a broker is configured (eagerly otherwise)."""

import datetime as dt
import time

import pytest
from django.conf import settings
from django.utils import timezone

from conversations.models import ProviderCall
from conversations.tasks import reap_interrupted_calls


@pytest.fixture
def calls(app_key):
    app, key, _ = app_key
    old = timezone.now() - dt.timedelta(hours=1)
    stale = ProviderCall.objects.create(request_id="stale", application=app, api_key=key, status="in_progress", created_at=old)
    fresh = ProviderCall.objects.create(request_id="fresh", application=app, api_key=key, status="in_progress", created_at=timezone.now())
    done = ProviderCall.objects.create(request_id="done", application=app, api_key=key, status="succeeded", outcome="answered", created_at=old)
    return stale, fresh, done


def _wait_for(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_reaper_closes_only_stale_calls(calls):
    stale, fresh, done = calls
    if settings.CELERY_BROKER_URL:
        from celery.contrib.testing.worker import start_worker

        from config.celery import app

        with start_worker(app, queues=["maintenance"], perform_ping_check=False, pool="solo"):
            reap_interrupted_calls.delay()
            assert _wait_for(lambda: ProviderCall.objects.get(pk=stale.pk).status == "interrupted")
    else:
        reap_interrupted_calls.delay()
    stale.refresh_from_db()
    fresh.refresh_from_db()
    done.refresh_from_db()
    assert (stale.status, stale.outcome, stale.error_code) == ("interrupted", "failed", "interrupted")
    assert stale.completed_at is not None
    assert fresh.status == "in_progress"
    assert done.status == "succeeded"
