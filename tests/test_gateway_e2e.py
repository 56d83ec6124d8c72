"""The unmodified openai client against the running gateway and the running
simulator: answers arrive as OpenAI would send them, and every call leaves a
complete record."""

import json

import httpx
import openai
import pytest

from budgets.selectors import cost_of
from conversations.models import Conversation, Message, ProviderCall


def client(gateway, secret, **kw):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=secret, max_retries=0, **kw)


def sim_log(sim):
    return httpx.get(f"{sim.control_url}/log", timeout=5).json()["entries"]


MESSAGES = [
    {"role": "system", "content": "You are a support assistant."},
    {"role": "user", "content": "How do I reset my password?"},
]


def test_non_streaming_answer_is_recorded(gateway, sim, app_key):
    app, key, secret = app_key
    raw = client(gateway, secret).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        temperature=0.2,
        extra_headers={"X-Request-ID": "req-e2e-1", "X-Conversation-ID": "ticket-1", "X-End-User": "user-42"},
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"] == "req-e2e-1"
    assert raw.headers["x-governance-outcome"] == "answered"
    assert completion.choices[0].message.content

    call = ProviderCall.objects.get(request_id="req-e2e-1")
    assert (call.status, call.outcome, call.http_status) == ("succeeded", "answered", 200)
    assert call.application == app and call.api_key == key
    assert call.conversation.external_id == "ticket-1" and call.end_user == "user-42"
    assert call.model_requested == call.model_used == "gpt-4o-mini"
    assert call.parameters["temperature"] == 0.2
    assert call.prompt_tokens == completion.usage.prompt_tokens
    assert call.completion_tokens == completion.usage.completion_tokens
    assert call.usage_source == "provider"
    assert call.cost_usd == cost_of(
        price=call.price, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens
    )
    assert call.cost_usd > 0
    assert call.latency_ms is not None and call.provider_latency_ms is not None
    assert call.estimated_prompt_tokens > 0 and call.token_count_is_estimate  # gpt-4o-mini is o200k; counted with cl100k
    assert call.decisions == []

    sent = list(call.messages.filter(direction="request").order_by("position"))
    assert [(m.role, m.content) for m in sent] == [(m["role"], m["content"]) for m in MESSAGES]
    answer = call.messages.get(direction="response")
    assert answer.content == completion.choices[0].message.content

    [entry] = sim_log(sim)
    assert entry["id"] == call.provider_response_id == completion.id


def test_streaming_with_usage(gateway, sim, app_key):
    _, _, secret = app_key
    stream = client(gateway, secret).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"X-Request-ID": "req-stream-1"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text and usage is not None and chunks[-1].choices == []

    call = ProviderCall.objects.get(request_id="req-stream-1")
    assert call.stream and call.status == "succeeded" and call.outcome == "answered"
    assert call.messages.get(direction="response").content == text
    assert (call.prompt_tokens, call.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert call.usage_source == "provider" and call.cost_usd > 0


def test_streaming_without_usage_still_records_provider_usage(gateway, sim, app_key):
    _, _, secret = app_key
    chunks = list(
        client(gateway, secret).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"X-Request-ID": "req-stream-2"}
        )
    )
    assert all(c.usage is None for c in chunks), "the client did not ask for the usage chunk"
    assert all(c.choices for c in chunks)
    call = ProviderCall.objects.get(request_id="req-stream-2")
    assert call.usage_source == "provider" and call.prompt_tokens > 0 and call.completion_tokens > 0


def test_conversation_accumulates_calls(gateway, sim, app_key):
    _, _, secret = app_key
    c = client(gateway, secret)
    history = list(MESSAGES)
    for turn in range(3):
        reply = c.chat.completions.create(
            model="gpt-4o-mini", messages=history, extra_headers={"X-Conversation-ID": "conv-acc"}
        )
        history += [{"role": "assistant", "content": reply.choices[0].message.content}, {"role": "user", "content": f"and then {turn}?"}]
    conv = Conversation.objects.get(external_id="conv-acc")
    calls = list(conv.calls.all())
    assert conv.call_count == 3 == len(calls)
    assert conv.total_cost_usd == sum(call.cost_usd for call in calls)
    assert conv.total_tokens == sum(call.total_tokens for call in calls)
    assert conv.title == "How do I reset my password?"


def test_user_field_is_the_end_user_and_no_conversation_header_makes_one(gateway, sim, app_key):
    _, _, secret = app_key
    client(gateway, secret).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, user="end-user-7", extra_headers={"X-Request-ID": "req-user"}
    )
    call = ProviderCall.objects.get(request_id="req-user")
    assert call.end_user == "end-user-7" and call.conversation.external_id.startswith("auto_")


def test_default_model_of_the_application(gateway, sim, app_key):
    app, _, secret = app_key
    resp = httpx.post(
        f"{gateway}/v1/chat/completions", json={"messages": MESSAGES},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": "req-default"},
    )
    assert resp.status_code == 200
    assert ProviderCall.objects.get(request_id="req-default").model_used == app.default_model


def test_cached_tokens_are_priced_as_cached(gateway, sim, app_key):
    _, _, secret = app_key
    httpx.post(f"{sim.control_url}/faults", json={"faults": [], "force_cached_tokens": 16}).raise_for_status()
    long = [{"role": "user", "content": "word " * 40}]
    reply = client(gateway, secret).chat.completions.create(model="gpt-4o", messages=long, extra_headers={"X-Request-ID": "req-cached"})
    call = ProviderCall.objects.get(request_id="req-cached")
    assert call.cached_tokens == reply.usage.prompt_tokens_details.cached_tokens == 16
    uncached_cost = cost_of(price=call.price, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens)
    assert call.cost_usd == uncached_cost - 16 * (call.price.input_per_million - call.price.cached_input_per_million) / 1_000_000


def test_models_endpoint_lists_priced_models(gateway, sim, app_key):
    _, _, secret = app_key
    ids = {m.id for m in client(gateway, secret).models.list()}
    assert {"gpt-4o-mini", "gpt-4o"} <= ids
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "gk-wrong").models.list()


UPSTREAM_FAULTS = [
    ("500", 502, "upstream_error", openai.InternalServerError),
    ("429", 429, "upstream_rate_limited", openai.RateLimitError),
    ("malformed", 502, "upstream_malformed_response", openai.InternalServerError),
    ("reset", 502, "upstream_connection_error", openai.InternalServerError),
]


@pytest.mark.parametrize("fault,status,code,exc", UPSTREAM_FAULTS, ids=[f[0] for f in UPSTREAM_FAULTS])
def test_upstream_failures_are_answered_and_recorded(gateway, sim, app_key, fault, status, code, exc):
    app, _, secret = app_key
    app.max_retries = 0  # retries are covered in test_resilience.py
    app.save()
    httpx.post(f"{sim.control_url}/faults", json={"faults": [fault]}).raise_for_status()
    with pytest.raises(exc) as info:
        client(gateway, secret).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Request-ID": f"req-{fault}"}
        )
    assert info.value.status_code == status
    assert info.value.body["code"] == code
    assert info.value.response.headers["x-governance-outcome"] == "failed"
    call = ProviderCall.objects.get(request_id=f"req-{fault}")
    assert (call.status, call.outcome, call.error_code, call.http_status) == ("failed", "failed", code, status)
    assert call.cost_usd is None or call.cost_usd >= 0
    assert call.messages.filter(direction="request").count() == 2, "what was sent is kept"
    assert not call.messages.filter(direction="response").exists()
    if fault == "429":
        assert info.value.response.headers["retry-after"]


def test_provider_timeout(gateway, sim, app_key):
    app, _, secret = app_key
    app.max_retries = 0
    app.read_timeout_s = 0.5
    app.save()
    httpx.post(f"{sim.control_url}/faults", json={"faults": ["hang"]}).raise_for_status()
    with pytest.raises(openai.APIStatusError) as info:
        client(gateway, secret).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Request-ID": "req-hang"}
        )
    assert info.value.status_code == 504
    assert info.value.response.headers["x-governance-reason"] == "provider_down"
    call = ProviderCall.objects.get(request_id="req-hang")
    assert call.error_code == "upstream_timeout" and call.status == "failed"
    assert [a["outcome"] for a in call.attempts] == ["error"]


def test_stream_cut_midway_ends_with_error_event_and_partial_record(gateway, sim, app_key):
    _, _, secret = app_key
    httpx.post(f"{sim.control_url}/faults", json={"faults": ["cut"]}).raise_for_status()
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client(gateway, secret).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"X-Request-ID": "req-cut"}
        ):
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert "stream" in str(info.value).lower()
    call = ProviderCall.objects.get(request_id="req-cut")
    assert call.status == "failed" and call.error_code == "upstream_stream_interrupted"
    partial = "".join(received)
    assert partial and call.messages.get(direction="response").content == partial
    assert call.usage_source == "estimated" and call.completion_tokens > 0 and call.cost_usd > 0


def test_an_overlong_stream_event_ends_the_stream_as_malformed(gateway, sim, app_key, monkeypatch):
    """A provider line longer than the gateway will hold is not buffered
    without end: the stream ends with an error event and the call says why."""
    from conversations.gateway import pipeline

    _, _, secret = app_key
    monkeypatch.setattr(pipeline, "MAX_STREAM_EVENT_BYTES", 40)  # every event of the simulator is longer
    with httpx.stream(
        "POST", f"{gateway}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": "req-long"}, timeout=30,
    ) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 1 and "[DONE]" not in events[0]
    error = json.loads(events[0][5:])["error"]
    assert error["code"] == "upstream_malformed_response" and "longer than 40 bytes" in error["message"]
    call = ProviderCall.objects.get(request_id="req-long")
    assert call.status == "failed" and call.error_code == "upstream_malformed_response"


def _server_timing(header: str) -> dict[str, float]:
    phases = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        phases[name] = float(dur)
    return phases


def test_answer_says_where_its_time_went(gateway, sim, app_key):
    """Server-Timing splits a slow answer into the gateway's phases, so a
    caller (or the load benchmark) can tell gateway queueing from provider time."""
    _, _, secret = app_key
    httpx.post(f"{sim.control_url}/faults", json={"faults": [], "latency_ms": 300}).raise_for_status()
    raw = client(gateway, secret).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    phases = _server_timing(raw.headers["server-timing"])
    # "open" is its own phase where the open is group-committed (Postgres);
    # on the ORM path it is part of admission.
    assert {"admit", "provider", "record", "total"} <= set(phases) <= {"admit", "open", "provider", "record", "total"}
    assert 300 <= phases["provider"] < 2000
    assert all(v >= 0 for v in phases.values())
    assert phases["total"] >= sum(v for k, v in phases.items() if k != "total") - 1
    call = ProviderCall.objects.get(request_id=raw.headers["x-request-id"])
    assert abs(call.latency_ms - phases["total"]) <= phases["record"] + 5  # the record was written before the answer left


def test_failed_answer_has_no_misleading_timing(gateway, sim, app_key):
    app, _, secret = app_key
    app.max_retries = 0
    app.save()
    httpx.post(f"{sim.control_url}/faults", json={"faults": ["500"]}).raise_for_status()
    with pytest.raises(openai.APIStatusError) as info:
        client(gateway, secret).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    phases = _server_timing(info.value.response.headers["server-timing"])
    assert "provider" not in phases and "record" not in phases
    assert phases["admit"] >= 0


def test_stream_says_how_long_admission_and_the_provider_took_to_start(gateway, sim, app_key):
    """A stream's headers leave before the answer, so its Server-Timing can
    only cover admission and the wait for the provider's response to begin."""
    _, _, secret = app_key
    httpx.post(f"{sim.control_url}/faults", json={"faults": [], "latency_ms": 300}).raise_for_status()
    with client(gateway, secret).chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as resp:
        phases = _server_timing(resp.headers["server-timing"])
        assert "".join(resp.iter_lines())
    assert {"admit", "provider_headers"} <= set(phases) <= {"admit", "open", "provider_headers"}
    assert 300 <= phases["provider_headers"] < 2000


def test_a_streams_last_event_leaves_with_the_end_of_the_body():
    """The [DONE] (or error) event and the end of the chunked body go out as
    one ASGI message, which the HTTP server writes with one send: the client
    reads the stream's end in one piece. A stream without a final part still
    ends with an empty body message."""
    import asyncio

    from conversations.gateway.asgi import FinalPart, StreamResponse, _send

    async def parts(last):
        yield b"data: {}\n\n"
        yield last

    def messages(last):
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(_send(StreamResponse(parts(last), content_type="text/event-stream"), send))
        return [(m["type"], m.get("body"), m.get("more_body", False)) for m in sent]

    assert messages(FinalPart(b"data: [DONE]\n\n"))[1:] == [
        ("http.response.body", b"data: {}\n\n", True),
        ("http.response.body", b"data: [DONE]\n\n", False),
    ]
    assert messages(b"data: [DONE]\n\n")[1:] == [
        ("http.response.body", b"data: {}\n\n", True),
        ("http.response.body", b"data: [DONE]\n\n", True),
        ("http.response.body", None, False),
    ]
