"""The native API: an application's own conversations, their messages, and
server-side history; another application's data is never reachable."""

import pytest
from rest_framework.test import APIClient

from conversations.models import Conversation, ProviderCall


def api(secret=None):
    c = APIClient()
    if secret:
        c.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return c


def assert_error(resp, status, code=None):
    assert resp.status_code == status, resp.content
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "code", "param"}
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def test_server_side_history(sim, app_key):
    app, _, secret = app_key
    app.system_prompt = "You are terse."
    app.save()
    c = api(secret)
    created = c.post("/api/v1/conversations/", {"id": "ticket-9", "end_user": "u-1"}, format="json")
    assert created.status_code == 201 and created.json()["id"] == "ticket-9"

    first = c.post("/api/v1/conversations/ticket-9/messages/", {"content": "Where is my order?"}, format="json")
    assert first.status_code == 201, first.content
    assert first.json()["outcome"] == "answered" and first.json()["message"]["content"]
    second = c.post("/api/v1/conversations/ticket-9/messages/", {"content": "It was order 42."}, format="json")
    assert second.status_code == 201

    # the second call carried the whole history: system, user, assistant, user
    call = ProviderCall.objects.get(request_id=second.json()["request_id"])
    sent = list(call.messages.filter(direction="request").order_by("position").values_list("role", "content"))
    assert sent == [
        ("system", "You are terse."),
        ("user", "Where is my order?"),
        ("assistant", first.json()["message"]["content"]),
        ("user", "It was order 42."),
    ]
    assert call.end_user == "u-1"

    transcript = c.get("/api/v1/conversations/ticket-9/messages/").json()
    assert [m["role"] for m in transcript] == ["system", "user", "assistant", "user", "assistant"]
    assert transcript[-1]["content"] == second.json()["message"]["content"]

    detail = c.get("/api/v1/conversations/ticket-9/").json()
    assert detail["call_count"] == 2 and float(detail["total_cost_usd"]) > 0


def test_conversations_list_is_scoped_to_the_application(sim, app_key, other_app_key):
    _, _, mine = app_key
    _, _, theirs = other_app_key
    api(theirs).post("/api/v1/conversations/", {"id": "their-secret-chat"}, format="json")
    api(mine).post("/api/v1/conversations/", {"id": "my-chat"}, format="json")

    listed = api(mine).get("/api/v1/conversations/").json()
    assert [c["id"] for c in listed["results"]] == ["my-chat"]
    assert_error(api(mine).get("/api/v1/conversations/their-secret-chat/"), 404)
    assert_error(api(mine).get("/api/v1/conversations/their-secret-chat/messages/"), 404)
    assert_error(api(mine).post("/api/v1/conversations/their-secret-chat/messages/", {"content": "hi"}, format="json"), 404)
    assert Conversation.objects.get(external_id="their-secret-chat").call_count == 0


def test_same_id_in_two_applications_is_two_conversations(app_key, other_app_key):
    for _, _, secret in (app_key, other_app_key):
        assert api(secret).post("/api/v1/conversations/", {"id": "shared-id"}, format="json").status_code == 201
    assert Conversation.objects.filter(external_id="shared-id").count() == 2


@pytest.mark.parametrize(
    "secret,code",
    [(None, "not_authenticated"), ("gk-bogus", "invalid_api_key")],
)
def test_authentication_required(app_key, secret, code):
    assert_error(api(secret).get("/api/v1/conversations/"), 401, code)


def test_revoked_key_is_refused(app_key):
    from governance.services import revoke_api_key

    _, key, secret = app_key
    revoke_api_key(api_key=key)
    assert_error(api(secret).get("/api/v1/conversations/"), 401, "revoked_api_key")


def test_bad_input(app_key):
    _, _, secret = app_key
    c = api(secret)
    c.post("/api/v1/conversations/", {"id": "t"}, format="json")
    err = assert_error(c.post("/api/v1/conversations/", {"id": "has spaces"}, format="json"), 400)
    assert err["param"] == "id"
    assert_error(c.post("/api/v1/conversations/", {"id": "t"}, format="json"), 409, "conflict")
    err = assert_error(c.post("/api/v1/conversations/t/messages/", {"content": "   "}, format="json"), 400)
    assert err["param"] == "content"
    assert_error(c.post("/api/v1/conversations/t/messages/", {}, format="json"), 400)
    assert_error(c.post("/api/v1/conversations/t/messages/", {"content": "hi", "max_tokens": -1}, format="json"), 400)
    assert_error(c.post("/api/v1/conversations/t/messages/", b"{not json", content_type="application/json"), 400, "parse_error")
    assert ProviderCall.objects.count() == 0


def test_gateway_refusal_is_passed_through(sim, app_key):
    _, _, secret = app_key
    c = api(secret)
    c.post("/api/v1/conversations/", {"id": "t"}, format="json")
    err = assert_error(c.post("/api/v1/conversations/t/messages/", {"content": "hi", "model": "gpt-imaginary"}, format="json"), 404, "model_not_found")
    assert "gpt-imaginary" in err["message"]
    assert ProviderCall.objects.get().error_code == "model_not_found"


def test_schema_and_docs_are_served(client, db):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200 and b"/api/v1/conversations/" in schema.content
    assert client.get("/api/docs/").status_code == 200


def test_flagged_answer_status_for_the_bot(sim, app_key, other_app_key):
    import httpx as _httpx

    app, _, secret = app_key
    c = api(secret)
    c.post("/api/v1/conversations/", {"id": "t"}, format="json")
    rid = c.post("/api/v1/conversations/t/messages/", {"content": "What is your refund policy?"}, format="json").json()["request_id"]
    status = c.get(f"/api/v1/calls/{rid}/").json()
    assert status["flagged"] is False and status["user_message"] is None and status["outcome"] == "answered"

    flagged = c.post(f"/api/v1/calls/{rid}/flags/", {"reason": "It promised a refund we don't offer."}, format="json")
    assert flagged.status_code == 201
    status = c.get(f"/api/v1/calls/{rid}/").json()
    assert status["flagged"] is True and status["user_message"] == app.flagged_message
    assert status["flags"][0]["reason"] == "It promised a refund we don't offer."

    assert_error(c.post(f"/api/v1/calls/{rid}/flags/", {"reason": "  "}, format="json"), 400)
    assert_error(api(other_app_key[2]).get(f"/api/v1/calls/{rid}/"), 404)
    assert_error(api(other_app_key[2]).post(f"/api/v1/calls/{rid}/flags/", {"reason": "x"}, format="json"), 404)
    assert_error(c.get("/api/v1/calls/no-such-call/"), 404)
