"""Liveness, readiness, metrics, and the request id on every log line."""

import logging

import httpx
import pytest


def test_healthz_and_readyz(client, db):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"] == "ok"


def test_readyz_reports_a_broker_that_is_down(client, db, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["broker"] != "ok"
    assert resp.json()["checks"]["database"] == "ok"


def test_metrics_count_outcomes(gateway, app_key):
    _, _, secret = app_key
    httpx.post(f"{gateway}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {secret}"})
    httpx.post(f"{gateway}/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {secret}"})
    text = httpx.get(f"{gateway}/metrics").text
    assert 'gateway_requests_total{code="",outcome="answered"}' in text
    assert 'gateway_requests_total{code="missing_parameter",outcome="refused"}' in text


def test_every_log_line_of_a_request_carries_its_id_and_no_secret(gateway, app_key, caplog):
    _, _, secret = app_key
    caplog.set_level(logging.INFO)
    httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "my card is 4111 1111 1111 1111"}]},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": "req-logs-1"},
    )
    httpx.post(
        f"{gateway}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": "req-logs-2"},
    )
    gateway_records = [r for r in caplog.records if r.name == "gateway"]
    assert len(gateway_records) >= 2
    for rid in ("req-logs-1", "req-logs-2"):
        assert any(rid in r.getMessage() or rid in str(getattr(r, "msg", "")) for r in gateway_records), rid
    everything = "\n".join(str(r.msg) for r in caplog.records)
    assert secret not in everything
    assert "4111" not in everything
