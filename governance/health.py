"""Liveness, readiness and metrics endpoints for the process supervisor and Prometheus."""

import hmac
import ipaddress
import os

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess


def healthz(request):
    return JsonResponse({"status": "ok"})


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any driver error means "not ready"; reported, not hidden
        return f"{type(exc).__name__}"
    return None


def _check_broker() -> str | None:
    if not settings.CELERY_BROKER_URL:
        return None
    from config.celery import app

    try:
        with app.connection_for_write(url=settings.CELERY_BROKER_URL) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # broker down: reported in the body, never raised
        return f"{type(exc).__name__}"
    return None


def _check_shared_cache() -> str | None:
    """Redis backs breakers, rate limits and the response cache. Without it the
    gateway still serves (per-process fallback), so this degrades, never fails, readiness."""
    if not settings.REDIS_URL:
        return None
    from django.core.cache import caches

    from conversations.gateway import shared

    try:
        caches["default"].get("readyz-probe")
    except Exception as exc:  # any client error means degraded; reported, not hidden
        return f"degraded ({type(exc).__name__}): breakers, rate limits and cache are per process"
    return shared.status()


def readyz(request):
    checks = {"database": _check_database(), "broker": _check_broker()}
    cache = _check_shared_cache()
    body = {
        "status": "ready" if not any(checks.values()) else "not ready",
        "checks": {
            name: ("skipped (not configured)" if name == "broker" and not settings.CELERY_BROKER_URL else (err or "ok"))
            for name, err in checks.items()
        },
    }
    body["checks"]["shared_cache"] = "skipped (not configured)" if not settings.REDIS_URL else (cache or "ok")
    if cache:
        body["degraded"] = [cache]
    return JsonResponse(body, status=200 if body["status"] == "ready" else 503)


def _scrape_refused(request) -> JsonResponse | None:
    """The gateway faces the bots, so its metrics (traffic, outcomes, error
    codes) are not for anyone who can reach it: a scraper sends
    METRICS_TOKEN, or, with none set, scrapes from this machine (behind a
    proxy, uvicorn takes the client address from X-Forwarded-For)."""
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(sent.strip().encode(), token.encode()):
            return None
        resp = _error(401, "Send the metrics token: Authorization: Bearer <METRICS_TOKEN>.", "authentication_error", "metrics_token_required")
        resp["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return resp
    try:
        local = ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        local = False
    if local:
        return None
    return _error(
        403, "Metrics are served to this machine only; set METRICS_TOKEN to scrape from elsewhere.",
        "permission_error", "metrics_local_only",
    )


def _error(status: int, message: str, type_: str, code: str) -> JsonResponse:
    """The platform's one error shape (conversations/gateway/errors.py)."""
    from conversations.gateway.errors import GatewayError

    return JsonResponse(GatewayError(status, message, code, type=type_).body(), status=status)


def metrics(request):
    """Under config.serve the workers share their metrics through files
    (PROMETHEUS_MULTIPROC_DIR): this answers for all of them."""
    if (refused := _scrape_refused(request)) is not None:
        return refused
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
