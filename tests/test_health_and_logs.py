"""Liveness, readiness, metrics, and the request id on every log line."""

import logging

import httpx
import pytest
from django.db import connection


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
    # Neither the prompt nor the card number in it; "4111" alone can occur in
    # a log line's microsecond timestamp, so the check looks for the grouped digits.
    assert "my card is" not in everything
    assert "4111 1111" not in everything


def test_server_shutdown_closes_provider_pools_and_database_connections(transactional_db, app_key, sim):
    """uvicorn's lifespan shutdown reaches the gateway: its provider sessions
    are closed and its database threads let go of their connections."""
    import httpx

    from conversations.gateway import provider
    from tests.conftest import _Server

    other_loops = set(provider._sessions.keys())  # e.g. the session-wide test server's
    server = _Server()
    server.start()
    loop_sessions = []
    try:
        resp = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
            headers={"Authorization": f"Bearer {app_key[2]}"},
            timeout=30,
        )
        assert resp.status_code == 200
        loop_sessions = [
            s for loop, per_loop in list(provider._sessions.items()) if loop not in other_loops for s in per_loop.values()
        ]
        assert loop_sessions and not any(s.closed for s in loop_sessions)
        sessions_before = _db_sessions() if connection.vendor == "postgresql" else 0
    finally:
        server.stop()
    assert not server.thread.is_alive()
    assert all(s.closed for s in loop_sessions)
    if connection.vendor == "postgresql":
        assert _db_sessions() < sessions_before  # the database threads let go of theirs


def _db_sessions() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
        return cursor.fetchone()[0]


def test_metrics_are_for_this_machine_unless_a_token_is_set(client, db):
    """The gateway faces the bots: its traffic figures are not for anyone
    who can reach it."""
    assert client.get("/metrics", REMOTE_ADDR="127.0.0.1").status_code == 200
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    far = client.get("/metrics", REMOTE_ADDR="203.0.113.9")
    assert far.status_code == 403
    assert far.json()["error"]["code"] == "metrics_local_only" and "METRICS_TOKEN" in far.json()["error"]["message"]
    assert b"gateway_requests_total" not in far.content


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic czNjcjN0LW1ldHJpY3M=", "Bearer "])
def test_with_a_metrics_token_every_scrape_must_send_it(client, db, settings, authorization):
    settings.METRICS_TOKEN = "s3cr3t-metrics"
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    refused = client.get("/metrics", REMOTE_ADDR="127.0.0.1", **headers)  # from this machine too
    assert refused.status_code == 401 and refused["WWW-Authenticate"].startswith("Bearer")
    assert refused.json()["error"]["code"] == "metrics_token_required"
    assert b"gateway_requests_total" not in refused.content
    ok = client.get("/metrics", REMOTE_ADDR="203.0.113.9", HTTP_AUTHORIZATION="Bearer s3cr3t-metrics")
    assert ok.status_code == 200 and b"gateway_requests_total" in ok.content
