"""Every kind of bad request gets the right 4xx in OpenAI's error shape, is
recorded as refused where it reached the gateway, and writes nothing else."""

import datetime as dt

import httpx
import orjson
import pytest

from budgets.models import LanguageModel, ModelPrice
from conversations.models import Conversation, Message, ProviderCall
from governance.services import revoke_api_key

OK_MESSAGES = [{"role": "user", "content": "hello"}]


def post(gateway, secret, body, *, raw=None, headers=None):
    h = {"Content-Type": "application/json", "X-Request-ID": "req-bad-input-1"}
    if secret is not None:
        h["Authorization"] = f"Bearer {secret}"
    h.update(headers or {})
    content = raw if raw is not None else orjson.dumps(body)
    return httpx.post(f"{gateway}/v1/chat/completions", content=content, headers=h, timeout=30)


def assert_refused(resp, status, code, param=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    assert resp.headers["X-Request-ID"] == "req-bad-input-1"
    assert resp.headers["X-Governance-Outcome"] == "refused"
    calls = list(ProviderCall.objects.filter(request_id="req-bad-input-1"))
    assert len(calls) == 1, "a refused request is recorded exactly once"
    call = calls[0]
    assert call.status == "refused" and call.outcome == "refused"
    assert call.http_status == status and call.error_code == code
    assert Message.objects.count() == 0 and Conversation.objects.count() == 0, "nothing half-written"
    return call


BODY_CASES = [
    ("invalid json", None, b'{"model": "gpt-4o-mini", "messages": [', 400, "invalid_json", None),
    ("top-level array", [1, 2], None, 400, "invalid_type", None),
    ("missing messages", {"model": "gpt-4o-mini"}, None, 400, "missing_parameter", "messages"),
    ("messages not a list", {"messages": "hi"}, None, 400, "invalid_type", "messages"),
    ("empty messages", {"messages": []}, None, 400, "empty_messages", "messages"),
    ("message not an object", {"messages": ["hi"]}, None, 400, "invalid_type", "messages[0]"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, None, 400, "invalid_role", "messages[0].role"),
    ("empty content", {"messages": [{"role": "user", "content": "   "}]}, None, 400, "empty_content", "messages[0].content"),
    ("content wrong type", {"messages": [{"role": "user", "content": 42}]}, None, 400, "invalid_type", "messages[0].content"),
    ("NUL in content", {"messages": [{"role": "user", "content": "a\u0000b"}]}, None, 400, "invalid_characters", "messages[0].content"),
    ("max_tokens wrong type", {"messages": OK_MESSAGES, "max_tokens": "10"}, None, 400, "invalid_value", "max_tokens"),
    ("temperature out of range", {"messages": OK_MESSAGES, "temperature": 3}, None, 400, "invalid_value", "temperature"),
    ("stream not boolean", {"messages": OK_MESSAGES, "stream": "yes"}, None, 400, "invalid_type", "stream"),
    ("unknown parameter", {"messages": OK_MESSAGES, "frobnicate": 1}, None, 400, "unknown_parameter", "frobnicate"),
    ("tool message without id", {"messages": [{"role": "tool", "content": "42"}]}, None, 400, "missing_parameter", "messages[0].tool_call_id"),
    ("invalid utf-8", None, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', 400, "invalid_encoding", None),
    ("empty body", None, b"", 400, "empty_body", None),
]


@pytest.mark.parametrize("name,body,raw,status,code,param", BODY_CASES, ids=[c[0] for c in BODY_CASES])
def test_bad_body(gateway, app_key, name, body, raw, status, code, param):
    app, key, secret = app_key
    call = assert_refused(post(gateway, secret, body, raw=raw), status, code, param)
    assert call.application == app and call.api_key == key


def test_twenty_megabyte_body_is_413(gateway, app_key):
    _, _, secret = app_key
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * (20 * 1024 * 1024) + b'"}]}'
    resp = post(gateway, secret, None, raw=big)
    call = assert_refused(resp, 413, "request_too_large")
    assert "limit" in resp.json()["error"]["message"]
    assert call.application is not None


def test_missing_key(gateway, app_key):
    call = assert_refused(post(gateway, None, {"messages": OK_MESSAGES}), 401, "missing_api_key")
    assert call.application is None


def test_invalid_key(gateway, app_key):
    call = assert_refused(post(gateway, "gk-not-a-real-key-at-all", {"messages": OK_MESSAGES}), 401, "invalid_api_key")
    assert call.application is None and call.key_prefix == "gk-not-a-re"


def test_revoked_key(gateway, app_key):
    app, key, secret = app_key
    revoke_api_key(api_key=key)
    call = assert_refused(post(gateway, secret, {"messages": OK_MESSAGES}), 401, "revoked_api_key")
    assert call.api_key is None and call.key_prefix == key.prefix


def test_suspended_application(gateway, app_key):
    app, key, secret = app_key
    app.is_active = False
    app.save()
    assert_refused(post(gateway, secret, {"messages": OK_MESSAGES}), 403, "application_suspended")


def test_unknown_model(gateway, app_key):
    resp = post(gateway, app_key[2], {"model": "gpt-imaginary", "messages": OK_MESSAGES})
    call = assert_refused(resp, 404, "model_not_found", "model")
    assert "gpt-imaginary" in resp.json()["error"]["message"]
    assert call.model_requested == "gpt-imaginary"


def test_model_without_price_is_refused_not_free(gateway, app_key):
    LanguageModel.objects.create(name="gpt-unpriced")
    future = LanguageModel.objects.create(name="gpt-next")
    ModelPrice.objects.create(
        model=future, effective_from=dt.datetime(2999, 1, 1, tzinfo=dt.timezone.utc),
        input_per_million=1, output_per_million=2,
    )
    for name in ("gpt-unpriced", "gpt-next"):
        resp = post(gateway, app_key[2], {"model": name, "messages": OK_MESSAGES}, headers={"X-Request-ID": f"req-{name}"})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "model_not_priced"
        assert "no price" in resp.json()["error"]["message"]
        call = ProviderCall.objects.get(request_id=f"req-{name}")
        assert call.cost_usd is None and call.status == "refused"
    assert Message.objects.count() == 0


def test_bad_headers(gateway, app_key):
    assert_refused(
        post(gateway, app_key[2], {"messages": OK_MESSAGES}, headers={"X-Step": "not a step!"}), 400, "invalid_header", "X-Step"
    )


def test_wrong_method(gateway, app_key):
    resp = httpx.get(f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {app_key[2]}"})
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"
    assert resp.headers["Allow"] == "POST"


def test_auth_is_checked_before_body(gateway, app_key):
    """A caller without a valid key learns nothing about the body rules."""
    resp = post(gateway, "gk-wrong", None, raw=b"not json")
    assert resp.status_code == 401


def test_generated_request_id_when_absent_or_unsafe(gateway, app_key):
    r1 = httpx.post(f"{gateway}/v1/chat/completions", content=b"{}", headers={"Authorization": f"Bearer {app_key[2]}"})
    r2 = httpx.post(
        f"{gateway}/v1/chat/completions", content=b"{}",
        headers={"Authorization": f"Bearer {app_key[2]}", "X-Request-ID": "bad id with spaces"},
    )
    for r in (r1, r2):
        assert r.status_code == 400
        assert r.headers["X-Request-ID"].startswith("req_")
        assert ProviderCall.objects.filter(request_id=r.headers["X-Request-ID"]).count() == 1


def test_revocation_and_price_changes_apply_on_the_next_request_despite_caching(gateway, app_key):
    """The gateway caches configuration per process; a change must still be
    seen at once (the shared generation moves on every save)."""
    app, key, secret = app_key
    ok = post(gateway, secret, {"messages": OK_MESSAGES}, headers={"X-Request-ID": "warm"})
    assert ok.status_code == 200
    revoke_api_key(api_key=key)
    resp = post(gateway, secret, {"messages": OK_MESSAGES}, headers={"X-Request-ID": "after-revoke"})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "revoked_api_key"

    from governance.services import create_api_key

    secret2 = create_api_key(application=app).secret
    model = LanguageModel.objects.get(name="gpt-4o-mini")
    model.is_active = False
    model.save()
    resp = post(gateway, secret2, {"model": "gpt-4o-mini", "messages": OK_MESSAGES}, headers={"X-Request-ID": "after-disable"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"


def test_unknown_v1_path_is_an_openai_shaped_404(gateway, app_key):
    resp = httpx.post(f"{gateway}/v1/completions", content=b"{}", headers={"X-Request-ID": "req-nowhere"})
    assert resp.status_code == 404
    assert resp.headers["X-Request-ID"] == "req-nowhere"
    error = resp.json()["error"]
    assert error["code"] == "not_found" and "/v1/completions" in error["message"]
    assert not ProviderCall.objects.filter(request_id="req-nowhere").exists()


def test_body_split_across_many_chunks_is_read_whole(gateway, app_key):
    """Clients that stream their request body (chunked encoding) are read in full."""
    body = orjson.dumps({"messages": OK_MESSAGES, "max_tokens": 8})

    def chunks():
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    resp = httpx.post(
        f"{gateway}/v1/chat/completions", content=chunks(),
        headers={"Authorization": f"Bearer {app_key[2]}", "X-Request-ID": "req-chunked"}, timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert ProviderCall.objects.get(request_id="req-chunked").status == "succeeded"


def test_chunked_body_over_the_limit_is_413(gateway, app_key, settings):
    limit = settings.GATEWAY["MAX_BODY_BYTES"]

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"}]}'

    resp = httpx.post(
        f"{gateway}/v1/chat/completions", content=chunks(),
        headers={"Authorization": f"Bearer {app_key[2]}", "X-Request-ID": "req-chunked-big"}, timeout=30,
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    call = ProviderCall.objects.get(request_id="req-chunked-big")
    assert call.status == "refused" and not call.messages.exists()
