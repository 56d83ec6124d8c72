"""The gateway's request path: parse, admit (auth, model, price, count, open
the record), ask the provider, relay the answer, finish the record.

The provider leg and the relay are async; the two database sections
(admission and finish) each take one hop to a DB thread.
"""

import asyncio
import time

import httpx
import orjson
import structlog
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import Error as DatabaseError
from django.http import HttpResponse, StreamingHttpResponse

from conversations import services
from conversations.gateway import metrics, provider
from conversations.gateway.admission import Admitted, Headers, admit
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


def _polite_reply(refusal: PoliteRefusal, chat: ChatRequest, request_id: str) -> HttpResponse:
    """The application's polite reply, shaped as an ordinary completion so an
    unmodified client shows it to the end user."""
    ident, created, model = "gov-" + request_id, int(time.time()), chat.model or ""
    if not chat.stream:
        body = {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": refusal.message}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        resp = HttpResponse(orjson.dumps(body), content_type="application/json")
    else:
        def chunk(delta, finish=None, **extra):
            return b"data: " + orjson.dumps({
                "id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra,
            }) + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""}), chunk({"content": refusal.message}), chunk({}, "stop")]
        if chat.include_usage:
            events.append(b"data: " + orjson.dumps({
                "id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        resp = HttpResponse(b"".join(events), content_type="text/event-stream")
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
    return await asyncio.shield(db_section(services.finish_call, call_id=admitted.call_id, result=result))


def _headers(resp: HttpResponse, request_id: str, outcome: str, admitted: Admitted) -> HttpResponse:
    resp["X-Request-ID"] = request_id
    resp["X-Governance-Outcome"] = outcome
    resp["X-Conversation-ID"] = admitted.conversation_external_id
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
        admitted = await db_section(
            admit, request_id=request_id, headers=headers, chat=chat, body_error=body_error, started=started
        )
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
        admitted = await db_section(
            admit, request_id=request_id, headers=headers, chat=chat, body_error=None, started=started, api_key=api_key
        )
    except GatewayError as err:
        return err.http_status, err.body(), err.outcome
    resp = await _complete(admitted, request_id, started)
    return resp.status_code, orjson.loads(resp.content), resp["X-Governance-Outcome"]


async def _complete(admitted: Admitted, request_id: str, started: float) -> HttpResponse:
    client = provider.client_for(admitted.upstream.base_url)
    asked = time.perf_counter()
    result = None
    try:
        try:
            upstream = await client.send(provider.build_request(admitted.upstream, admitted.payload))
        except httpx.HTTPError as exc:
            err = provider.transport_error(exc)
            result = _failure(err, started, provider_latency_ms=_ms(asked))
            return await _error_reply(admitted, result, err, request_id)
        provider_ms = _ms(asked)
        if upstream.status_code >= 400:
            err = provider.http_error(upstream)
            result = _failure(err, started, provider_latency_ms=provider_ms)
            return await _error_reply(admitted, result, err, request_id)
        try:
            body = orjson.loads(upstream.content)
            choice = body["choices"][0]
            message = choice.get("message") or {}
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            err = provider.malformed("the body is not a chat completion")
            result = _failure(err, started, provider_latency_ms=provider_ms)
            return await _error_reply(admitted, result, err, request_id)
        result = services.CallResult(
            status=Status.SUCCEEDED,
            outcome=Outcome.ANSWERED,
            http_status=200,
            latency_ms=0,
            provider_latency_ms=provider_ms,
            content=message.get("content") or "",
            tool_calls=message.get("tool_calls"),
            finish_reason=choice.get("finish_reason") or "",
            provider_response_id=str(body.get("id") or ""),
            provider_model=str(body.get("model") or ""),
        )
        _with_usage(result, _usage(body) if body.get("usage") else None, admitted)
        result.latency_ms = _ms(started)
        try:
            await _finish(admitted, result)
        except DatabaseError:
            log.exception("gateway.record_failed", call_id=admitted.call_id)
            return _recording_failed(request_id)
        log.info("gateway.answered", call_id=admitted.call_id, tokens=(result.prompt_tokens, result.completion_tokens), latency_ms=result.latency_ms)
        resp = HttpResponse(upstream.content, content_type="application/json")
        return _headers(resp, request_id, result.outcome, admitted)
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
                    error_message="The client disconnected before the answer arrived.",
                ),
            )
        raise


async def _error_reply(admitted: Admitted, result: services.CallResult, err: GatewayError, request_id: str):
    log.warning("gateway.upstream_failed", code=err.code, status=err.http_status, call_id=admitted.call_id)
    await _finish(admitted, result)
    return _headers(err.response(request_id), request_id, err.outcome, admitted)


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


def _sse_error(err: GatewayError) -> bytes:
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


async def _stream(admitted: Admitted, chat: ChatRequest, request_id: str, started: float) -> HttpResponse:
    client = provider.client_for(admitted.upstream.base_url)
    asked = time.perf_counter()
    try:
        upstream = await client.send(provider.build_request(admitted.upstream, admitted.payload), stream=True)
    except httpx.HTTPError as exc:
        err = provider.transport_error(exc)
        return await _error_reply(admitted, _failure(err, started, provider_latency_ms=_ms(asked)), err, request_id)
    except asyncio.CancelledError:
        await _finish(admitted, _failure(GatewayError(499, "The client disconnected.", "client_disconnected", status=Status.CANCELLED, outcome=Outcome.FAILED), started))
        raise
    if upstream.status_code >= 400:
        await upstream.aread()
        await upstream.aclose()
        err = provider.http_error(upstream)
        return await _error_reply(admitted, _failure(err, started, provider_latency_ms=_ms(asked)), err, request_id)

    async def relay():
        state = _StreamState()
        done = False
        err = None
        cancelled = False
        try:
            async for line in upstream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    err = provider.malformed("a stream event is not JSON")
                    break
                if "error" in chunk:
                    detail = (chunk.get("error") or {}).get("message", "")
                    err = provider.upstream_error(502, f"The provider failed mid-stream. {detail}".strip(), "upstream_error")
                    break
                state.feed(chunk)
                if not chat.include_usage and not chunk.get("choices") and chunk.get("usage"):
                    continue  # the client did not ask for the usage chunk
                yield b"data: " + data.encode() + b"\n\n"
            if not done and err is None:
                err = provider.upstream_error(502, "The provider's stream ended before it was complete.", "upstream_stream_interrupted")
        except httpx.HTTPError as exc:
            err = provider.upstream_error(
                502, f"The provider's stream broke off ({type(exc).__name__}).", "upstream_stream_interrupted"
            )
        except (asyncio.CancelledError, GeneratorExit):
            cancelled = True
            raise
        finally:
            await upstream.aclose()
            if cancelled:
                result = state.result(
                    status=Status.CANCELLED, outcome=Outcome.FAILED, http_status=499, latency_ms=_ms(started),
                    provider_latency_ms=_ms(asked), error_code="client_disconnected",
                    error_message="The client disconnected during the stream.",
                )
            elif err is not None:
                result = state.result(
                    status=err.status, outcome=err.outcome, http_status=200, latency_ms=_ms(started),
                    provider_latency_ms=_ms(asked), error_type=err.type, error_code=err.code, error_message=err.message,
                )
            else:
                result = state.result(
                    status=Status.SUCCEEDED, outcome=Outcome.ANSWERED, http_status=200,
                    latency_ms=_ms(started), provider_latency_ms=_ms(asked),
                )
            _with_usage(result, state.usage, admitted)
            try:
                await _finish(admitted, result)
            except DatabaseError:
                log.exception("gateway.record_failed", call_id=admitted.call_id)
                if not cancelled and err is None:
                    err = GatewayError(503, "The answer could not be recorded.", "recording_failed", type="api_error")
        if err is not None and not cancelled:
            log.warning("gateway.stream_failed", code=err.code, call_id=admitted.call_id)
            yield _sse_error(err)
        elif not cancelled:
            yield b"data: [DONE]\n\n"

    resp = StreamingHttpResponse(relay(), content_type="text/event-stream")
    resp["Cache-Control"] = "no-cache"
    resp["X-Accel-Buffering"] = "no"
    return _headers(resp, request_id, Outcome.DEGRADED if admitted.degraded else Outcome.ANSWERED, admitted)
