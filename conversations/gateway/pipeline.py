"""The gateway's request path: parse, admit (auth, model, price, count, open
the record), ask the provider, relay the answer, finish the record.

The provider leg and the relay are async. Admission takes one hop to a
database thread; on Postgres the call's two writes (open and finish) are
then handed to group commit, and the request waits for them on the event loop.
"""

import asyncio
import time
from decimal import Decimal

import orjson
import structlog
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import Error as DatabaseError
from django.http import HttpResponse

from conversations import recording_sql, services
from conversations.gateway import metrics, provider, shared
from conversations.gateway.asgi import FinalPart, StreamResponse
from conversations.gateway.attempts import Attempts, AttemptsFailed, send
from conversations.gateway.admission import Admitted, Headers, admit_async
from conversations.gateway.dbsection import db_section
from conversations.gateway.errors import GatewayError, Outcome, PoliteRefusal, Status
from conversations.gateway.tokens import count_text
from conversations.gateway.validation import ChatRequest, parse_body, too_large

log = structlog.get_logger("gateway")


def _ms(since: float) -> int:
    return int((time.perf_counter() - since) * 1000)


def _read_body(request) -> tuple[ChatRequest | None, GatewayError | None]:
    limit = settings.GATEWAY["MAX_BODY_BYTES"]
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return None, too_large(declared, limit)
    try:
        raw = request.body
    except RequestDataTooBig:
        return None, too_large(declared or limit + 1, limit)
    try:
        return parse_body(raw, max_messages=settings.GATEWAY["MAX_MESSAGES"]), None
    except GatewayError as err:
        return None, err


def _usage(body: dict) -> dict:
    usage = body.get("usage") or {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "cached_tokens": prompt_details.get("cached_tokens") or 0,
        "reasoning_tokens": completion_details.get("reasoning_tokens") or 0,
    }


def _with_usage(result: services.CallResult, usage: dict | None, admitted: Admitted) -> None:
    """Provider-reported usage when there is one; otherwise a local estimate,
    marked as such (a cut stream reports none)."""
    if usage and usage.get("prompt_tokens") is not None:
        result.prompt_tokens = int(usage["prompt_tokens"])
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
        result.cached_tokens = int(usage.get("cached_tokens") or 0)
        result.reasoning_tokens = int(usage.get("reasoning_tokens") or 0)
        result.usage_source = "provider"
    else:
        result.prompt_tokens = admitted.estimated_prompt_tokens
        result.completion_tokens = count_text(result.content, encoding=admitted.model_encoding).tokens
        result.cached_tokens = 0
        result.usage_source = "estimated"


def _failure(err: GatewayError, started: float, **kw) -> services.CallResult:
    kw.setdefault("provider_latency_ms", None)
    return services.CallResult(
        status=err.status,
        outcome=err.outcome,
        http_status=err.http_status,
        latency_ms=_ms(started),
        error_type=err.type,
        error_code=err.code,
        error_message=err.message,
        **kw,
    )


def _assistant_reply(text: str, *, model: str, request_id: str, stream: bool, include_usage: bool) -> HttpResponse:
    """A reply written by the gateway (a polite refusal or failure message),
    shaped as an ordinary completion so an unmodified client shows it."""
    ident, created = "gov-" + request_id, int(time.time())
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not stream:
        body = {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": zero,
        }
        return HttpResponse(orjson.dumps(body), content_type="application/json")

    def event(choices, **extra) -> bytes:
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, **extra}
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    events = [
        event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        event([{"index": 0, "delta": {"content": text}, "finish_reason": None}]),
        event([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ]
    if include_usage:
        events.append(event([], usage=zero))
    events.append(b"data: [DONE]\n\n")
    return HttpResponse(b"".join(events), content_type="text/event-stream")


def _polite_reply(refusal: PoliteRefusal, chat: ChatRequest, request_id: str) -> HttpResponse:
    resp = _assistant_reply(refusal.message, model=chat.model or "", request_id=request_id, stream=chat.stream, include_usage=chat.include_usage)
    resp["X-Request-ID"] = request_id
    resp["X-Governance-Outcome"] = Outcome.REFUSED
    resp["X-Error-Code"] = refusal.code
    return resp


async def _finish(admitted: Admitted, result: services.CallResult) -> services.FinishedCall:
    if admitted.reservation and not any(d.get("kind") == "budget_reserved" for d in result.decisions):
        result.decisions.insert(0, admitted.reservation)
    if admitted.degraded and result.outcome == Outcome.ANSWERED:
        result.outcome = Outcome.DEGRADED
    # Shielded: a client that goes away must not stop the record being written.
    return await asyncio.shield(_finish_with_retries(admitted.opened, result))


FINISH_RETRY_DELAYS_S = (0.2, 0.4, 0.8, 1.6, 2.0)


async def _finish_with_retries(call: services.OpenedCall, result: services.CallResult) -> services.FinishedCall:
    """The provider has answered (and billed): ride out a short database blip
    (a failover or restart takes seconds) rather than lose the record. Safe to
    repeat: finishing is one transaction, conditional on the call still being open."""
    for delay in (*FINISH_RETRY_DELAYS_S, None):
        try:
            if services.sql_recording():
                return await recording_sql.finish_call_async(call=call, result=result)
            return await db_section(services.finish_call, call=call, result=result)
        except DatabaseError:
            if delay is None:
                raise
            log.warning("gateway.record_retry", call_id=call.call_id, retry_in_s=delay)
            await asyncio.sleep(delay)


_abandoned: set[asyncio.Task] = set()  # closings of calls whose client left during admission


async def _admit(**request) -> Admitted:
    """admit_async, carried to its end even when the client goes away
    meanwhile. Its database work (on a thread, or in a group-commit
    transaction) goes on and may open the call all the same; nobody would
    finish that call, and its budget holds would stay until the reaper
    expired them. Such a call is closed as cancelled as soon as it is open."""
    admission = asyncio.ensure_future(admit_async(**request))
    try:
        return await asyncio.shield(admission)
    except asyncio.CancelledError:
        admission.add_done_callback(lambda task: _close_abandoned(task, request["started"]))
        raise


def _close_abandoned(admission: asyncio.Task, started: float) -> None:
    if admission.cancelled() or admission.exception() is not None:
        return  # nothing was opened; a refusal is recorded as it stands
    err = GatewayError(
        499, "The client disconnected before the provider was asked.", "client_disconnected",
        status=Status.CANCELLED, outcome=Outcome.FAILED,
    )
    closing = asyncio.ensure_future(_finish(admission.result(), _failure(err, started)))
    _abandoned.add(closing)
    closing.add_done_callback(_closed)


def _closed(closing: asyncio.Task) -> None:
    _abandoned.discard(closing)
    if not closing.cancelled() and closing.exception() is not None:
        log.error("gateway.abandoned_call_not_closed", error=type(closing.exception()).__name__)


def _headers(resp: HttpResponse, request_id: str, outcome: str, admitted: Admitted) -> HttpResponse:
    resp["X-Request-ID"] = request_id
    resp["X-Governance-Outcome"] = outcome
    resp["X-Conversation-ID"] = admitted.conversation_external_id
    if admitted.timing:
        resp["Server-Timing"] = ", ".join(f"{name};dur={ms:g}" for name, ms in admitted.timing.items())
    return resp


def _recording_failed(request_id: str) -> HttpResponse:
    err = GatewayError(
        503,
        "The answer could not be recorded, so it is withheld. Retry shortly.",
        "recording_failed",
        type="api_error",
        status=Status.FAILED,
        outcome=Outcome.FAILED,
        headers={"Retry-After": "1"},
    )
    return err.response(request_id)


async def handle_chat_completion(request) -> HttpResponse:
    started = time.perf_counter()
    resp = await _handle(request, started)
    outcome = resp.get("X-Governance-Outcome", "failed")
    code = "" if resp.status_code < 400 else resp.get("X-Error-Code", str(resp.status_code))
    metrics.REQUESTS.labels(outcome, code).inc()
    metrics.LATENCY.observe(time.perf_counter() - started)
    return resp


async def _handle(request, started: float) -> HttpResponse:
    request_id = request.request_id
    headers = Headers.from_meta(request.META)
    chat, body_error = _read_body(request)
    try:
        admitted = await _admit(request_id=request_id, headers=headers, chat=chat, body_error=body_error, started=started)
    except PoliteRefusal as refusal:
        log.info("gateway.refused_politely", code=refusal.code)
        return _polite_reply(refusal, chat, request_id)
    except GatewayError as err:
        log.info("gateway.refused", code=err.code, status=err.http_status)
        return err.response(request_id)
    except DatabaseError:
        log.exception("gateway.database_unavailable")
        return GatewayError(
            503, "The gateway's database is unavailable; nothing was sent to the model. Retry shortly.",
            "database_unavailable", type="api_error", status=Status.FAILED, outcome=Outcome.FAILED,
            headers={"Retry-After": "2"},
        ).response(request_id)
    if chat.stream:
        return await _stream(admitted, chat, request_id, started)
    return await _complete(admitted, request_id, started)


async def complete_for_api(
    *, request_id: str, api_key, conversation_external_id: str, chat: ChatRequest
) -> tuple[int, dict, str]:
    """One non-streaming turn for the native API, through the same admission,
    provider and recording path as /v1/chat/completions."""
    started = time.perf_counter()
    headers = Headers(authorization="", conversation_id=conversation_external_id, end_user="", step="")
    try:
        admitted = await _admit(
            request_id=request_id, headers=headers, chat=chat, body_error=None, started=started, api_key=api_key
        )
    except GatewayError as err:
        return err.http_status, err.body(), err.outcome
    async with provider.ephemeral_sessions():
        resp = await _complete(admitted, request_id, started)
    return resp.status_code, orjson.loads(resp.content), resp["X-Governance-Outcome"]


async def _complete(admitted: Admitted, request_id: str, started: float) -> HttpResponse:
    attempts = Attempts(started=started)
    result = None
    try:
        cached = _cached(admitted)
        if cached is not None:
            return await _answer(admitted, request_id, started, cached, admitted.routes[0], attempts, cache_hit=True)
        asking = time.perf_counter()
        try:
            sent = await send(routes=admitted.routes, policy=admitted.policy, attempts=attempts, stream=False)
        except AttemptsFailed as failed:
            result = _failure(failed.err, started, attempts=attempts.items)
            return await _error_reply(admitted, result, failed, request_id, stream=False)
        result = True
        admitted.took("provider", asking)
        _store_cached(admitted, sent.raw)
        return await _answer(admitted, request_id, started, sent.raw, sent.route, attempts, body=sent.body)
    except asyncio.CancelledError:
        if result is None:
            await _finish(
                admitted,
                services.CallResult(
                    status=Status.CANCELLED,
                    outcome=Outcome.FAILED,
                    http_status=499,
                    latency_ms=_ms(started),
                    error_code="client_disconnected",
                    error_message="The client disconnected before the answer arrived; the provider call was cancelled.",
                    attempts=attempts.items,
                ),
            )
        raise


async def _answer(admitted, request_id, started, raw: bytes, route, attempts, *, body=None, cache_hit=False) -> HttpResponse:
    body = body if body is not None else orjson.loads(raw)
    choice = body["choices"][0]
    message = choice.get("message") or {}
    result = services.CallResult(
        status=Status.SUCCEEDED,
        outcome=Outcome.ANSWERED,
        http_status=200,
        latency_ms=0,
        provider_latency_ms=attempts.items[-1]["latency_ms"] if attempts.items else 0,
        content=message.get("content") or "",
        tool_calls=message.get("tool_calls"),
        finish_reason=choice.get("finish_reason") or "",
        provider_response_id=str(body.get("id") or ""),
        provider_model=str(body.get("model") or ""),
        attempts=attempts.items,
        **_route_fields(admitted, route),
    )
    _with_usage(result, _usage(body) if body.get("usage") else None, admitted)
    if cache_hit:
        result.cost_override = Decimal(0)
        result.provider_latency_ms = 0
        result.decisions.append({"kind": "cache_hit", "provider_cost_usd": "0"})
    result.latency_ms = _ms(started)
    recording = time.perf_counter()
    try:
        await _finish(admitted, result)
    except DatabaseError:
        log.exception("gateway.record_failed", call_id=admitted.call_id)
        return _recording_failed(request_id)
    admitted.took("record", recording)
    admitted.took("total", started)
    log.info("gateway.answered", call_id=admitted.call_id, tokens=(result.prompt_tokens, result.completion_tokens), latency_ms=result.latency_ms, cache_hit=cache_hit)
    resp = HttpResponse(raw, content_type="application/json")
    return _headers(resp, request_id, result.outcome, admitted)


def _route_fields(admitted: Admitted, route) -> dict:
    """A fallback route changes the model used and the price billed."""
    if route is admitted.routes[0]:
        return {}
    return {"model_used": route.model.name, "price_id": route.price.pk, "decisions": [{"kind": "fallback_used", "model": route.model.name, "provider": route.upstream.base_url}]}


def _cached(admitted: Admitted) -> bytes | None:
    if not admitted.cache_key:
        return None
    return shared.get(admitted.cache_key)


def _store_cached(admitted: Admitted, raw: bytes) -> None:
    if admitted.cache_key:
        shared.set(admitted.cache_key, raw, admitted.cache_ttl_s)


async def _error_reply(admitted: Admitted, result: services.CallResult, failed: AttemptsFailed, request_id: str, *, stream: bool):
    err = failed.err
    log.warning("gateway.upstream_failed", code=err.code, status=err.http_status, reason=failed.reason, call_id=admitted.call_id)
    result.decisions.append({"kind": "failure", "reason": failed.reason, "code": err.code, "reply": admitted.failure_reply})
    await _finish(admitted, result)
    if admitted.failure_reply == "polite" and failed.reason in ("deadline_exceeded", "provider_down"):
        text = admitted.slow_message if failed.reason == "deadline_exceeded" else admitted.down_message
        resp = _assistant_reply(text, model=admitted.routes[0].model.name, request_id=request_id, stream=stream, include_usage=False)
        resp = _headers(resp, request_id, Outcome.FAILED, admitted)
    else:
        resp = _headers(err.response(request_id), request_id, err.outcome, admitted)
    resp["X-Governance-Reason"] = failed.reason
    return resp


class _StreamState:
    """What a relayed stream has said so far, for the record."""

    def __init__(self):
        self.content: list[str] = []
        self.tool_calls: dict[int, dict] = {}
        self.finish_reason = ""
        self.response_id = ""
        self.model = ""
        self.usage: dict | None = None

    def feed(self, chunk: dict) -> None:
        self.response_id = self.response_id or str(chunk.get("id") or "")
        self.model = self.model or str(chunk.get("model") or "")
        if chunk.get("usage"):
            self.usage = _usage(chunk)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.content.append(delta["content"])
            for tc in delta.get("tool_calls") or ():
                slot = self.tool_calls.setdefault(tc.get("index", 0), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def result(self, **kw) -> services.CallResult:
        return services.CallResult(
            content="".join(self.content),
            tool_calls=[self.tool_calls[i] for i in sorted(self.tool_calls)] or None,
            finish_reason=self.finish_reason,
            provider_response_id=self.response_id,
            provider_model=self.model,
            **kw,
        )


# A provider's stream line longer than this is refused as malformed rather
# than buffered without end.
MAX_STREAM_EVENT_BYTES = 1 << 20


def _event_too_long() -> GatewayError:
    return provider.malformed(f"a stream event is longer than {MAX_STREAM_EVENT_BYTES:,} bytes")


def _sse_error(err: GatewayError) -> bytes:
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


async def _stream(admitted: Admitted, chat: ChatRequest, request_id: str, started: float) -> HttpResponse:
    attempts = Attempts(started=started)
    asking = time.perf_counter()
    try:
        sent = await send(routes=admitted.routes, policy=admitted.policy, attempts=attempts, stream=True)
    except AttemptsFailed as failed:
        return await _error_reply(admitted, _failure(failed.err, started, attempts=attempts.items), failed, request_id, stream=True)
    except asyncio.CancelledError:
        await _finish(admitted, _failure(GatewayError(499, "The client disconnected.", "client_disconnected", status=Status.CANCELLED, outcome=Outcome.FAILED), started, attempts=attempts.items))
        raise
    upstream, route = sent.response, sent.route
    asked = time.perf_counter()
    # The headers leave now, before the answer: only the wait for the provider's first response.
    admitted.took("provider_headers", asking, asked)

    async def relay():
        state = _StreamState()
        done = False
        err = None
        cancelled = False

        def take(line: bytes, out: list[bytes]) -> None:
            """One line of the provider's stream: parsed once (for the
            record) and relayed as it came, without a decode/encode round trip."""
            nonlocal done, err
            if len(line) > MAX_STREAM_EVENT_BYTES:
                err = _event_too_long()
                return
            if not line.startswith(b"data:"):
                return
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                return
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                err = provider.malformed("a stream event is not JSON")
                return
            if "error" in chunk:
                detail = (chunk.get("error") or {}).get("message", "")
                err = provider.upstream_error(502, f"The provider failed mid-stream. {detail}".strip(), "upstream_error")
                return
            state.feed(chunk)
            if not chat.include_usage and not chunk.get("choices") and chunk.get("usage"):
                return  # the client did not ask for the usage chunk
            out.append(b"data: " + data + b"\n\n")

        def take_all(lines: list[bytes]) -> bytes:
            """The events to relay from these lines, up to [DONE] or an error."""
            out: list[bytes] = []
            for line in lines:
                take(line, out)
                if done or err is not None:
                    break
            return b"".join(out)

        try:
            # Whatever one read from the provider brought is relayed as one
            # write to the client: a provider that sends its events in a burst
            # costs one send instead of one per event (50 for a short answer).
            pending = b""
            async for piece in upstream.content.iter_any():
                *lines, pending = (pending + piece).split(b"\n")
                if relayed := take_all(lines):
                    yield relayed
                if done or err is not None:
                    break
                if len(pending) > MAX_STREAM_EVENT_BYTES:
                    err = _event_too_long()
                    break
            if not done and err is None and pending.strip():
                if relayed := take_all([pending]):  # a last line without its newline
                    yield relayed
            if not done and err is None:
                err = provider.upstream_error(502, "The provider's stream ended before it was complete.", "upstream_stream_interrupted")
        except provider.TRANSPORT_ERRORS as exc:
            err = provider.upstream_error(
                502, f"The provider's stream broke off ({type(exc).__name__}).", "upstream_stream_interrupted"
            )
        except (asyncio.CancelledError, GeneratorExit):
            cancelled = True
            raise
        finally:
            if done:
                upstream.release()  # the connection goes back to the pool
            else:
                upstream.close()  # cut, failed or cancelled: drop the connection, which stops the provider
            common = dict(latency_ms=_ms(started), provider_latency_ms=_ms(asked), attempts=attempts.items, **_route_fields(admitted, route))
            if cancelled:
                result = state.result(
                    status=Status.CANCELLED, outcome=Outcome.FAILED, http_status=499, error_code="client_disconnected",
                    error_message="The client disconnected during the stream; the provider stream was closed.", **common,
                )
            elif err is not None:
                result = state.result(
                    status=err.status, outcome=err.outcome, http_status=200, error_type=err.type, error_code=err.code,
                    error_message=err.message, **common,
                )
            else:
                result = state.result(status=Status.SUCCEEDED, outcome=Outcome.ANSWERED, http_status=200, **common)
            _with_usage(result, state.usage, admitted)
            try:
                await _finish(admitted, result)
            except DatabaseError:
                log.exception("gateway.record_failed", call_id=admitted.call_id)
                if not cancelled and err is None:
                    err = GatewayError(503, "The answer could not be recorded.", "recording_failed", type="api_error")
        if err is not None and not cancelled:
            log.warning("gateway.stream_failed", code=err.code, call_id=admitted.call_id)
            yield FinalPart(_sse_error(err))
        elif not cancelled:
            yield FinalPart(b"data: [DONE]\n\n")

    resp = StreamResponse(relay(), content_type="text/event-stream")
    resp["Cache-Control"] = "no-cache"
    resp["X-Accel-Buffering"] = "no"
    return _headers(resp, request_id, Outcome.DEGRADED if admitted.degraded else Outcome.ANSWERED, admitted)
