"""An OpenAI-compatible provider simulator with fault injection.

A real HTTP server on loopback for the demo, the tests and the benchmarks. It is
plain asyncio (uvloop when importable) with a small hand-written HTTP/1.1 server
(keep-alive, pipelining, Content-Length and chunked request bodies, chunked
responses for streams), so that it is never the bottleneck when the gateway is
benchmarked against it. Django is only used for ``manage.py simulate_provider``.

Endpoints
    POST /v1/chat/completions   deterministic answers, ``stream`` with SSE chunks
    GET  /v1/models             a few OpenAI model ids (and /v1/models/{id})
    GET  /healthz               {"status": "ok"}
    POST /_sim/faults           queue faults / force cached tokens / override latency
    GET  /_sim/faults           the current queue and overrides
    POST /_sim/reset            clear queue, overrides, log, stats and prompt cache
    GET  /_sim/log              {"entries": [...]}: one entry per chat-completion request (?last=N)
    GET  /_sim/stats            counters

Faults (``500``, ``429``, ``hang``, ``reset``, ``malformed``, ``cut``) come from
the control queue first (one per chat-completion request, in order; ``ok`` in
the queue means "answer normally"), otherwise with probability ``fail_rate``
drawn uniformly from ``faults`` by an RNG seeded with ``seed``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import os
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from . import answers

try:  # fast JSON when available (it is a project dependency)
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def dumps_sorted(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)

    loads = orjson.loads
    JSONDecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover - orjson is a dependency
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def dumps_sorted(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()

    def loads(data: bytes) -> Any:
        return json.loads(data)

    JSONDecodeError = (ValueError, UnicodeDecodeError)


FAULT_NAMES = ("500", "429", "hang", "reset", "malformed", "cut")
QUEUE_NO_FAULT = "ok"  # a queue entry meaning "answer this one normally"
MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini")

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024
READ_PAUSE_BYTES = 4 * 1024 * 1024
CACHE_BLOCK = 128
CACHE_MIN_PROMPT_TOKENS = 1024
ANSWER_MEMO_ENTRIES = 8192


@dataclass
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0  # latency is latency_ms + uniform(-jitter_ms, +jitter_ms), never below 0
    seed: int = 0
    fail_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_NAMES
    retry_after: float = 1
    hang_s: float = 120.0
    chunk_delay_ms: float = 0.0
    log_file: str | None = None
    max_log_entries: int = 100_000
    cache_entries: int = 10_000

    def __post_init__(self) -> None:
        if isinstance(self.faults, str):
            self.faults = tuple(f.strip() for f in self.faults.split(",") if f.strip())
        self.faults = tuple(str(f) for f in self.faults)
        unknown = [f for f in self.faults if f not in FAULT_NAMES]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULT_NAMES)}")
        if not 0.0 <= float(self.fail_rate) <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.fail_rate > 0 and not self.faults:
            raise ValueError("fail_rate > 0 needs at least one fault")
        for name in ("latency_ms", "jitter_ms", "hang_s", "chunk_delay_ms", "retry_after"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0")


# --- HTTP plumbing -------------------------------------------------------------

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}

_LINGER_ZERO = struct.pack("ii", 1, 0)


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Request:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "http10")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes,
                 keep_alive: bool, http10: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def response_head(status: int, content_type: str | None, length: int | None, req: Request | None,
                  extra: str = "", chunked: bool = False) -> bytes:
    """Status line and headers. ``length`` None and not chunked: the body ends with the connection."""
    keep_alive = req is not None and req.keep_alive and (length is not None or chunked)
    parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nserver: provider-simulator\r\n"]
    if content_type:
        parts.append(f"content-type: {content_type}\r\n")
    if chunked:
        parts.append("transfer-encoding: chunked\r\n")
    elif length is not None:
        parts.append(f"content-length: {length}\r\n")
    if not keep_alive:
        parts.append("connection: close\r\n")
    elif req is not None and req.http10:
        parts.append("connection: keep-alive\r\n")
    parts.append(extra)
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


class Connection(asyncio.Protocol):
    """One client connection: parses requests, hands them to the simulator in order.

    A request is answered synchronously when it can be (no latency, no fault);
    otherwise a task answers it and the next pipelined request waits for it."""

    def __init__(self, sim: "Simulator") -> None:
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.eof = False
        self.task: asyncio.Task | None = None
        self.current: Request | None = None
        self._head: tuple | None = None  # parsed head waiting for its body
        self._chunks: list[bytes] | None = None  # chunked body being read
        self._chunk_state = 0  # 0 size line, 1 data, 2 trailers
        self._chunk_left = 0
        self._chunk_total = 0
        self._paused_writing = False
        self._paused_reading = False
        self._drain_waiter: asyncio.Future | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        self.sim.connections.add(self)
        self.sim.stats_connections += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None:
            self._process()
        elif len(self.buf) > READ_PAUSE_BYTES and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.task is None:
            return False  # close now
        return True  # answer the request in flight, then close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sim.connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # writing
    def write(self, data: bytes) -> None:
        if not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self._paused_writing and not self.closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def close(self) -> None:
        """Graceful close: buffered data is flushed, then FIN."""
        if not self.closed:
            self.transport.close()

    def reset(self) -> None:
        """Abort with SO_LINGER 0 so the peer sees a TCP reset, not a clean close."""
        if self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except (OSError, AttributeError):
                pass
        self.transport.abort()

    def send(self, req: Request | None, status: int, body: bytes,
             content_type: str = "application/json", extra: str = "") -> None:
        self.write(response_head(status, content_type, len(body), req, extra) + body)

    def send_json(self, req: Request | None, status: int, obj: Any, extra: str = "") -> None:
        self.send(req, status, dumps(obj), extra=extra)

    # request loop
    def _process(self) -> None:
        while not self.closed:
            try:
                req = self._parse()
            except _HttpError as exc:
                self.send_json(None, exc.status, error_body(exc.message))
                self.close()
                return
            if req is None:
                if self.eof and not self.buf:
                    self.close()
                return
            self.current = req
            try:
                result = self.sim.handle(self, req)
            except Exception as exc:  # a simulator bug must not look like a protocol failure
                print(f"simulator: error handling {req.method} {req.path}: {exc!r}", file=sys.stderr, flush=True)
                req.keep_alive = False
                self.send_json(req, 500, error_body(f"Simulator error: {exc!r}", type_="server_error"))
                self.close()
                return
            if result is not None:
                self.task = asyncio.get_running_loop().create_task(result)
                self.task.add_done_callback(self._task_done)
                return
            if not req.keep_alive:
                self.close()
                return

    def _task_done(self, task: asyncio.Task) -> None:
        self.task = None
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                print(f"simulator: handler error: {exc!r}", file=sys.stderr, flush=True)
                self.reset()
                return
        if self.closed:
            return
        req = self.current
        if req is None or not req.keep_alive or self.transport.is_closing():
            self.close()
            return
        if self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()
        if self.buf or self.eof:
            self._process()

    def _parse(self) -> Request | None:
        buf = self.buf
        if self._head is None:
            while buf[:2] == b"\r\n":  # tolerate stray CRLFs between requests
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise _HttpError(431, "Request headers too large.")
                return None
            if end > MAX_HEAD_BYTES:
                raise _HttpError(431, "Request headers too large.")
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            request_line = lines[0].split(b" ")
            if len(request_line) != 3:
                raise _HttpError(400, "Malformed request line.")
            method_b, target_b, version = request_line
            if version == b"HTTP/1.1":
                http10 = False
            elif version == b"HTTP/1.0":
                http10 = True
            else:
                raise _HttpError(505, "Only HTTP/1.0 and HTTP/1.1 are supported.")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                colon = line.find(b":")
                if colon <= 0:
                    raise _HttpError(400, "Malformed header line.")
                name = line[:colon].strip().lower().decode("latin-1")
                value = line[colon + 1:].strip().decode("latin-1")
                if name in headers:
                    headers[name] = headers[name] + ", " + value
                else:
                    headers[name] = value
            target = target_b.decode("latin-1")
            q = target.find("?")
            path, query = (target, "") if q < 0 else (target[:q], target[q + 1:])
            conn_tokens = headers.get("connection", "").lower()
            if http10:
                keep_alive = "keep-alive" in conn_tokens
            else:
                keep_alive = "close" not in conn_tokens
            te = headers.get("transfer-encoding")
            length = 0
            chunked = False
            if te is not None:
                if te.lower().replace(" ", "").split(",")[-1] != "chunked":
                    raise _HttpError(501, "Unsupported transfer-encoding.")
                chunked = True
                keep_alive = keep_alive and "content-length" not in headers
                self._chunks = []
                self._chunk_state = 0
                self._chunk_total = 0
            elif "content-length" in headers:
                cl = headers["content-length"]
                if not cl.isdigit():
                    raise _HttpError(400, "Invalid Content-Length.")
                length = int(cl)
                if length > MAX_BODY_BYTES:
                    raise _HttpError(413, "Request body too large.")
            self._head = (method_b.decode("latin-1"), path, query, headers, keep_alive, http10, chunked, length)
            if (chunked or length) and headers.get("expect", "").lower() == "100-continue" and not buf:
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        method, path, query, headers, keep_alive, http10, chunked, length = self._head
        if chunked:
            body = self._read_chunked()
            if body is None:
                return None
        else:
            if len(buf) < length:
                return None
            body = bytes(buf[:length])
            del buf[:length]
        self._head = None
        return Request(method, path, query, headers, body, keep_alive, http10)

    def _read_chunked(self) -> bytes | None:
        buf = self.buf
        chunks = self._chunks
        while True:
            if self._chunk_state == 0:  # size line
                idx = buf.find(b"\r\n")
                if idx < 0:
                    if len(buf) > 4096:
                        raise _HttpError(400, "Malformed chunk size line.")
                    return None
                size_text = bytes(buf[:idx]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _HttpError(400, "Malformed chunk size.") from None
                if size < 0:
                    raise _HttpError(400, "Malformed chunk size.")
                del buf[: idx + 2]
                self._chunk_total += size
                if self._chunk_total > MAX_BODY_BYTES:
                    raise _HttpError(413, "Request body too large.")
                if size == 0:
                    self._chunk_state = 2
                else:
                    self._chunk_left = size
                    self._chunk_state = 1
            elif self._chunk_state == 1:  # data + CRLF
                need = self._chunk_left + 2
                if len(buf) < need:
                    return None
                if buf[need - 2:need] != b"\r\n":
                    raise _HttpError(400, "Malformed chunk.")
                chunks.append(bytes(buf[: need - 2]))
                del buf[:need]
                self._chunk_state = 0
            else:  # trailers until an empty line
                idx = buf.find(b"\r\n")
                if idx < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise _HttpError(431, "Trailers too large.")
                    return None
                del buf[: idx + 2]
                if idx == 0:
                    self._chunks = None
                    return b"".join(chunks)


# --- the simulated provider ----------------------------------------------------

class _Computed:
    """What a (seed, model, messages) triple determines: counts, answer, cache keys."""

    __slots__ = ("prompt_tokens", "prefix_tokens", "content", "tokens", "prefix_key", "full_key")

    def __init__(self, prompt_tokens: int, prefix_tokens: int, content: str, tokens: list[int]) -> None:
        self.prompt_tokens = prompt_tokens
        self.prefix_tokens = prefix_tokens
        self.content = content
        self.tokens = tokens
        self.prefix_key: bytes | None = None
        self.full_key: bytes | None = None


class LogEntry:
    """One chat-completion request in the log (slotted: the log keeps up to 100k of them)."""

    __slots__ = ("id", "status", "fault", "stream", "model", "prompt_tokens", "completion_tokens",
                 "cached_tokens", "completed", "ts")
    FIELDS = __slots__

    def __init__(self, id_: str | None, status: int | None, fault: str | None, stream: bool,
                 model: str | None, prompt_tokens: int | None, completion_tokens: int | None,
                 cached_tokens: int | None, completed: bool, ts: float) -> None:
        self.id = id_
        self.status = status
        self.fault = fault
        self.stream = stream
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cached_tokens = cached_tokens
        self.completed = completed
        self.ts = ts

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


class _Call:
    __slots__ = ("req", "id", "created", "model", "stream", "include_usage", "content", "finish_reason",
                 "prompt_tokens", "completion_tokens", "cached_tokens", "entry")


class Simulator:
    """Request handling and state (fault queue, overrides, log, stats, prompt cache)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.connections: set[Connection] = set()
        self.fingerprint = "fp_" + hashlib.blake2b(str(config.seed).encode(), digest_size=5).hexdigest()
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._memo: dict[bytes, _Computed] = {}
        self._log_fh = open(config.log_file, "ab") if config.log_file else None
        self.stats_connections = 0
        self.reset()

    # state
    def reset(self) -> None:
        self.queue: collections.deque[str] = collections.deque()
        self.force_cached_tokens: int | None = None
        self.latency_override_ms: float | None = None
        self.fail_rate_override: float | None = None
        self.hang_override_s: float | None = None
        self.log: collections.deque[LogEntry] = collections.deque(maxlen=self.config.max_log_entries)
        self.prefix_cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.fault_rng = random.Random(f"faults:{self.config.seed}")
        self.jitter_rng = random.Random(f"jitter:{self.config.seed}")
        self.stats_http = 0
        self.stats_requests = 0
        self.stats_streams = 0
        self.stats_completed = 0
        self.stats_by_fault: collections.Counter[str] = collections.Counter()
        self.stats_by_status: collections.Counter[str] = collections.Counter()

    def control_state(self) -> dict:
        return {
            "queued": list(self.queue),
            "force_cached_tokens": self.force_cached_tokens,
            "latency_ms": self.latency_override_ms,
            "fail_rate": self.fail_rate_override,
            "hang_s": self.hang_override_s,
            "config": dataclasses.asdict(self.config),
        }

    def stats(self) -> dict:
        return {
            "requests": self.stats_requests,
            "streams": self.stats_streams,
            "completed": self.stats_completed,
            "by_fault": dict(self.stats_by_fault),
            "by_status": dict(self.stats_by_status),
            "http_requests": self.stats_http,
            "queued_faults": len(self.queue),
            "open_connections": len(self.connections),
            "connections": self.stats_connections,
            "log_entries": len(self.log),
        }

    def close(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # dispatch
    def handle(self, conn: Connection, req: Request) -> Awaitable[None] | None:
        self.stats_http += 1
        path = req.path
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        method = req.method
        if path == "/v1/chat/completions" or path == "/chat/completions":
            if method != "POST":
                return self._method_not_allowed(conn, req)
            return self.chat_completions(conn, req)
        if path == "/healthz":
            if method != "GET":
                return self._method_not_allowed(conn, req)
            conn.send(req, 200, b'{"status":"ok"}')
            return None
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                return self._method_not_allowed(conn, req)
            if not self._authorized(req):
                return self._unauthorized(conn, req)
            if path == "/v1/models":
                conn.send_json(req, 200, {"object": "list", "data": [self._model_obj(m) for m in MODEL_IDS]})
            else:
                model = path[len("/v1/models/"):]
                if model in MODEL_IDS:
                    conn.send_json(req, 200, self._model_obj(model))
                else:
                    conn.send_json(req, 404, error_body(
                        f"The model '{model}' does not exist or you do not have access to it.",
                        code="model_not_found"))
            return None
        if path.startswith("/_sim/"):
            return self.control(conn, req, path[len("/_sim/"):])
        conn.send_json(req, 404, error_body(f"Unknown request URL: {method} {req.path}.", code="unknown_url"))
        return None

    @staticmethod
    def _model_obj(model: str) -> dict:
        return {"id": model, "object": "model", "created": 1715367049, "owned_by": "system"}

    @staticmethod
    def _method_not_allowed(conn: Connection, req: Request) -> None:
        conn.send_json(req, 405, error_body(f"Method {req.method} not allowed for {req.path}."))
        return None

    @staticmethod
    def _authorized(req: Request) -> bool:
        auth = req.headers.get("authorization", "")
        return auth[:7].lower() == "bearer " and bool(auth[7:].strip())

    @staticmethod
    def _unauthorized(conn: Connection, req: Request) -> None:
        conn.send_json(req, 401, error_body(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", code="invalid_api_key"))
        return None

    # control API
    def control(self, conn: Connection, req: Request, name: str) -> None:
        method = req.method
        if name == "faults" and method == "POST":
            try:
                body = loads(req.body) if req.body.strip() else {}
            except JSONDecodeError:
                conn.send_json(req, 400, error_body("Body must be JSON."))
                return None
            problem = self._apply_control(body)
            if problem:
                conn.send_json(req, 400, error_body(problem))
            else:
                conn.send_json(req, 200, self.control_state())
        elif name == "faults" and method == "GET":
            conn.send_json(req, 200, self.control_state())
        elif name == "reset" and method == "POST":
            self.reset()
            conn.send_json(req, 200, {"status": "reset"})
        elif name == "log" and method == "GET":
            entries = self.log
            last = _query_int(req.query, "last")  # ?last=N: only the newest N entries
            if last is not None:
                entries = itertools.islice(entries, max(0, len(entries) - last), None)
            conn.send_json(req, 200, {"entries": [entry.as_dict() for entry in entries]})
        elif name == "stats" and method == "GET":
            conn.send_json(req, 200, self.stats())
        else:
            conn.send_json(req, 404, error_body(f"Unknown control URL: {method} {req.path}.", code="unknown_url"))
        return None

    def _apply_control(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Body must be a JSON object."
        faults = body.get("faults") or []
        if not isinstance(faults, list):
            return "'faults' must be a list."
        faults = [str(f) for f in faults]
        bad = [f for f in faults if f not in FAULT_NAMES and f != QUEUE_NO_FAULT]
        if bad:
            return f"Unknown fault(s) {bad}; known: {', '.join(FAULT_NAMES)} (and '{QUEUE_NO_FAULT}')."
        numbers: dict[str, float | None] = {}
        for key, minimum, maximum in (("force_cached_tokens", 0, None), ("latency_ms", 0, None),
                                      ("fail_rate", 0, 1), ("hang_s", 0, None)):
            if key not in body:
                continue
            value = body[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < minimum or (maximum is not None and value > maximum)):
                return f"'{key}' must be null or a number >= {minimum}" + (f" and <= {maximum}." if maximum else ".")
            numbers[key] = value
        self.queue.extend(faults)
        if "force_cached_tokens" in numbers:
            v = numbers["force_cached_tokens"]
            self.force_cached_tokens = None if v is None else int(v)
        if "latency_ms" in numbers:
            self.latency_override_ms = numbers["latency_ms"]
        if "fail_rate" in numbers:
            self.fail_rate_override = numbers["fail_rate"]
        if "hang_s" in numbers:
            self.hang_override_s = numbers["hang_s"]
        return None

    # chat completions
    def _reject(self, conn: Connection, req: Request, status: int, body: dict, model: Any = None,
                stream: Any = False) -> None:
        self._record(None, status, None, stream is True, model if isinstance(model, str) else None,
                     None, None, None, False, final=True)
        conn.send_json(req, status, body)
        return None

    def chat_completions(self, conn: Connection, req: Request) -> Awaitable[None] | None:
        if not self._authorized(req):
            self._record(None, 401, None, False, None, None, None, None, False, final=True)
            return self._unauthorized(conn, req)
        try:
            body = loads(req.body)
        except JSONDecodeError:
            return self._reject(conn, req, 400, error_body(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                "your HTTP library correctly. The OpenAI API expects a JSON payload.)"))
        problem = _validate(body)
        if problem is not None:
            message, param, code = problem
            return self._reject(conn, req, 400, error_body(message, code=code, param=param),
                                body.get("model") if isinstance(body, dict) else None,
                                body.get("stream") if isinstance(body, dict) else False)

        model: str = body["model"]
        messages: list[dict] = body["messages"]
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        cap = body.get("max_completion_tokens")
        if cap is None:
            cap = body.get("max_tokens")

        computed = self._compute(model, messages)
        cached = self._cached_tokens(computed)
        if cap is not None and cap < len(computed.tokens):
            content, completion_tokens = answers.truncate_to_tokens(computed.tokens, cap)
            finish_reason = "length"
        else:
            content, completion_tokens, finish_reason = computed.content, len(computed.tokens), "stop"

        fault = self._next_fault()
        delay = self._delay_s()

        call = _Call()
        call.req = req
        call.id = f"chatcmpl-{self._id_prefix}{next(self._ids):010d}"
        call.created = int(time.time())
        call.model = model
        call.stream = stream
        call.include_usage = include_usage
        call.content = content
        call.finish_reason = finish_reason
        call.prompt_tokens = computed.prompt_tokens
        call.completion_tokens = completion_tokens
        call.cached_tokens = cached
        call.entry = self._record(call.id, None, fault, stream, model, computed.prompt_tokens,
                                  completion_tokens, cached, False, final=False)
        if stream:
            self.stats_streams += 1

        if fault is None and delay <= 0 and (not stream or self.config.chunk_delay_ms <= 0):
            if stream:
                conn.write(self._stream_head(req) + self._stream_body(call, cut=False, framed=not req.http10)
                           + (b"" if req.http10 else b"0\r\n\r\n"))
                if req.http10:
                    conn.close()
            else:
                conn.send(req, 200, dumps(self._completion_obj(call)), extra=self._request_id_header())
            self._finish(call.entry, 200, True)
            return None
        return self._respond_later(conn, call, fault, delay)

    async def _respond_later(self, conn: Connection, call: _Call, fault: str | None, delay: float) -> None:
        entry = call.entry
        req = call.req
        status: int | None = None
        completed = False
        try:
            if fault == "hang":
                self._finish(entry, None, False)
                entry = None
                hang = self.hang_override_s if self.hang_override_s is not None else self.config.hang_s
                await asyncio.sleep(hang)
                conn.close()
                return
            if delay > 0:
                await asyncio.sleep(delay)
            if conn.closed:
                return
            if fault == "reset":
                conn.reset()
            elif fault == "500":
                status = 500
                conn.send_json(req, 500, error_body(
                    "The server had an error while processing your request. Sorry about that!",
                    type_="server_error"), extra=self._request_id_header())
            elif fault == "429":
                status = 429
                conn.send_json(req, 429, error_body(
                    f"Rate limit reached for {call.model} (simulated). Please try again in "
                    f"{_fmt_number(self.config.retry_after)}s.",
                    type_="rate_limit_error", code="rate_limit_exceeded"),
                    extra=f"retry-after: {_fmt_number(self.config.retry_after)}\r\n" + self._request_id_header())
            elif fault == "malformed":
                status = 200
                if call.stream:
                    framed = not req.http10
                    event = b'data: {"id":"' + call.id.encode() + b'","object":"chat.completion.chunk","choices":[{"ind\n\n'
                    done = b"data: [DONE]\n\n"
                    conn.write(self._stream_head(req) + (_frame(event) + _frame(done) + b"0\r\n\r\n"
                                                         if framed else event + done))
                    if not framed:
                        conn.close()
                else:
                    full = dumps(self._completion_obj(call))
                    conn.send(req, 200, full[: max(1, len(full) // 2)], extra=self._request_id_header())
            elif fault == "cut":
                status = 200
                if call.stream:
                    conn.write(self._stream_head(req, force_close=True)
                               + self._stream_body(call, cut=True, framed=not req.http10))
                else:
                    full = dumps(self._completion_obj(call))
                    conn.write(response_head(200, "application/json", len(full), req,
                                             self._request_id_header()) + full[: len(full) // 2])
                conn.close()  # flush what was sent, then FIN: the body is incomplete
            elif call.stream:
                status = 200
                completed = await self._stream_slowly(conn, call)
            else:
                status = 200
                conn.send(req, 200, dumps(self._completion_obj(call)), extra=self._request_id_header())
                completed = True
        finally:
            if entry is not None:
                self._finish(entry, status, completed and not conn.closed)

    async def _stream_slowly(self, conn: Connection, call: _Call) -> bool:
        req = call.req
        framed = not req.http10
        delay = self.config.chunk_delay_ms / 1000.0
        if delay <= 0:  # latency only: everything in one write
            conn.write(self._stream_head(req) + self._stream_body(call, cut=False, framed=framed)
                       + (b"0\r\n\r\n" if framed else b""))
            if not framed:
                conn.close()
            return not conn.closed
        events = self._stream_events(call, cut=False)
        conn.write(self._stream_head(req) + (_frame(events[0]) if framed else events[0]))
        for event in events[1:]:
            await asyncio.sleep(delay)
            if conn.closed:
                return False
            conn.write(_frame(event) if framed else event)
            await conn.drain()
        if conn.closed:
            return False
        if framed:
            conn.write(b"0\r\n\r\n")
        else:
            conn.close()
        return True

    # building responses
    def _request_id_header(self) -> str:
        return f"x-request-id: req_{self._id_prefix}{next(self._request_ids):012d}\r\n"

    def _stream_head(self, req: Request, force_close: bool = False) -> bytes:
        extra = "cache-control: no-cache\r\n" + self._request_id_header()
        if req.http10:  # no chunked encoding in HTTP/1.0: the stream ends with the connection
            return response_head(200, "text/event-stream; charset=utf-8", None, req, extra)
        if force_close:
            extra += "connection: close\r\n"
        return response_head(200, "text/event-stream; charset=utf-8", None, req, extra, chunked=True)

    def _completion_obj(self, call: _Call) -> dict:
        return {
            "id": call.id,
            "object": "chat.completion",
            "created": call.created,
            "model": call.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": call.content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": call.finish_reason,
            }],
            "usage": self._usage(call),
            "service_tier": "default",
            "system_fingerprint": self.fingerprint,
        }

    @staticmethod
    def _usage(call: _Call) -> dict:
        return {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "total_tokens": call.prompt_tokens + call.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": call.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }

    def _stream_events(self, call: _Call, cut: bool) -> list[bytes]:
        """SSE events: role chunk, content chunks, finish chunk, [usage chunk], [DONE].

        Content chunks are built from byte templates (one JSON encode per piece);
        the result is the same JSON OpenAI sends, keys in a fixed order."""
        base = dumps({"id": call.id, "object": "chat.completion.chunk", "created": call.created,
                      "model": call.model, "service_tier": "default",
                      "system_fingerprint": self.fingerprint})[:-1]
        usage_null = b',"usage":null' if call.include_usage else b""
        head = b"data: " + base + b',"choices":[{"index":0,"delta":'
        tail = b',"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
        content_head = head + b'{"content":'
        content_tail = b"}" + tail
        pieces = answers.stream_pieces(call.content)
        if cut:
            pieces = pieces[: max(1, len(pieces) // 2)] if pieces else []
        events = [head + b'{"role":"assistant","content":"","refusal":null}' + tail]
        events.extend([content_head + dumps(piece) + content_tail for piece in pieces])
        if cut:
            return events
        events.append(head + b'{},"logprobs":null,"finish_reason":' + dumps(call.finish_reason) + b"}]"
                      + usage_null + b"}\n\n")
        if call.include_usage:
            events.append(b"data: " + base + b',"choices":[],"usage":' + dumps(self._usage(call)) + b"}\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    def _stream_body(self, call: _Call, cut: bool, framed: bool) -> bytes:
        events = self._stream_events(call, cut)
        if framed:
            return b"".join(_frame(e) for e in events)
        return b"".join(events)

    # computing answers
    def _compute(self, model: str, messages: list[dict]) -> _Computed:
        canonical = dumps_sorted(messages)
        digest = answers.answer_digest(self.config.seed, model, canonical)
        computed = self._memo.get(digest)
        if computed is None:
            prompt_tokens, prefix_tokens = answers.prompt_token_counts(messages)
            content, tokens = answers.generate_answer(digest, messages)
            computed = _Computed(prompt_tokens, prefix_tokens, content, tokens)
            if prompt_tokens >= CACHE_MIN_PROMPT_TOKENS:
                computed.full_key = _cache_key(model, canonical)
                computed.prefix_key = _cache_key(model, dumps_sorted(messages[:-1])) if len(messages) > 1 else None
            if len(self._memo) >= ANSWER_MEMO_ENTRIES:
                self._memo.pop(next(iter(self._memo)))
            self._memo[digest] = computed
        return computed

    def _cached_tokens(self, computed: _Computed) -> int:
        cached = 0
        if computed.full_key is not None:
            lru = self.prefix_cache
            if computed.prefix_key is not None:
                if computed.prefix_key in lru:
                    lru.move_to_end(computed.prefix_key)
                    cached = min((computed.prefix_tokens // CACHE_BLOCK) * CACHE_BLOCK, computed.prompt_tokens)
                else:
                    lru[computed.prefix_key] = None
            lru[computed.full_key] = None  # a continued conversation hits on this one
            lru.move_to_end(computed.full_key)
            while len(lru) > self.config.cache_entries:
                lru.popitem(last=False)
        if self.force_cached_tokens is not None:
            cached = min(self.force_cached_tokens, computed.prompt_tokens)
        return cached

    def _next_fault(self) -> str | None:
        if self.queue:
            fault = self.queue.popleft()
            return None if fault == QUEUE_NO_FAULT else fault
        rate = self.fail_rate_override if self.fail_rate_override is not None else self.config.fail_rate
        if rate > 0 and self.config.faults and self.fault_rng.random() < rate:
            return self.fault_rng.choice(self.config.faults)
        return None

    def _delay_s(self) -> float:
        latency = self.latency_override_ms if self.latency_override_ms is not None else self.config.latency_ms
        jitter = self.config.jitter_ms
        if jitter > 0:
            latency += self.jitter_rng.uniform(-jitter, jitter)
        return max(0.0, latency) / 1000.0

    # the log
    def _record(self, id_: str | None, status: int | None, fault: str | None, stream: bool, model: str | None,
                prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None,
                completed: bool, final: bool) -> LogEntry:
        entry = LogEntry(id_, status, fault, stream, model, prompt_tokens, completion_tokens, cached_tokens,
                         completed, round(time.time(), 6))
        self.log.append(entry)
        self.stats_requests += 1
        self.stats_by_fault[fault or "none"] += 1
        if final:
            self._finish(entry, status, completed)
        return entry

    def _finish(self, entry: LogEntry, status: int | None, completed: bool) -> None:
        entry.status = status
        entry.completed = completed
        self.stats_by_status["no_response" if status is None else str(status)] += 1
        if completed:
            self.stats_completed += 1
        if self._log_fh is not None:
            self._log_fh.write(dumps(entry.as_dict()) + b"\n")
            self._log_fh.flush()


def _query_int(query: str, name: str) -> int | None:
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == name and value.isdigit():
            return int(value)
    return None


def _frame(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _cache_key(model: str, canonical: bytes) -> bytes:
    return hashlib.blake2b(model.encode("utf-8", "surrogatepass") + b"\0" + canonical, digest_size=16).digest()


def _validate(body: Any) -> tuple[str, str | None, str | None] | None:
    """(message, param, code) of the first problem, or None. Deliberately minimal."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object.", None, "invalid_type"
    model = body.get("model")
    if model is None:
        return "You must provide a model parameter.", "model", "missing_required_parameter"
    if not isinstance(model, str) or not model:
        return "Invalid 'model': expected a non-empty string.", "model", "invalid_type"
    if "messages" not in body:
        return "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
    messages = body["messages"]
    if not isinstance(messages, list):
        return "Invalid type for 'messages': expected an array.", "messages", "invalid_type"
    if not messages:
        return ("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages",
                "empty_array")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return (f"Invalid 'messages[{i}]': expected an object with a string 'role'.", f"messages[{i}]",
                    "invalid_type")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return "Invalid type for 'stream': expected a boolean.", "stream", "invalid_type"
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            return f"Invalid type for '{name}': expected an integer.", name, "invalid_type"
        if value < 1:
            return f"Invalid '{name}': integer below minimum value 1.", name, "integer_below_min_value"
    return None


# --- running -------------------------------------------------------------------

def format_base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class SimulatorServer:
    """The listening server. ``await start()``, then ``port`` / ``base_url``; ``await close()``."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.simulator = Simulator(config)
        self._server: asyncio.AbstractServer | None = None
        self.port: int = config.port

    async def start(self) -> None:
        answers.encoding()  # load the encoding before accepting traffic
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self.simulator), self.config.host, self.config.port,
            reuse_address=True, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def origin(self) -> str:
        return format_base_url(self.config.host, self.port)

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    @property
    def control_url(self) -> str:
        return self.origin + "/_sim"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.simulator.connections):
            if conn.task is not None:
                conn.task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except (asyncio.TimeoutError, Exception):
                pass
            self._server = None
        self.simulator.close()


async def serve(config: SimulatorConfig, ready: asyncio.Event | None = None, *,
                stop: asyncio.Event | None = None, handle_signals: bool = False,
                on_listening: Callable[[SimulatorServer], None] | None = None) -> None:
    """Run the simulator until ``stop`` is set (or SIGINT/SIGTERM with ``handle_signals``).

    ``on_listening(server)`` is called once the socket listens (``server.port`` is the
    bound port, useful with port 0), then ``ready`` is set."""
    server = SimulatorServer(config)
    await server.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
    try:
        if on_listening is not None:
            on_listening(server)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config: SimulatorConfig, on_listening: Callable[[SimulatorServer], None] | None = None) -> None:
    """Blocking entry point: serve on uvloop (when installed) until SIGINT/SIGTERM."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(config, handle_signals=True, on_listening=on_listening))
