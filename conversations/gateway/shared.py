"""Counters shared by every gateway worker: Django's cache, which is Redis in
production. If Redis stops answering, the gateway keeps serving: each process
falls back to its own memory for a while, logs it once, and /readyz says so.

Redis calls are short (socket timeouts of a quarter second, set in settings)
and after a failure Redis is not tried again for a few seconds, so a dead
Redis costs at most one timeout per process per few seconds."""

import asyncio
import threading
import time

import structlog
from django.core.cache import caches
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

log = structlog.get_logger("gateway.shared")

RETRY_AFTER_S = 5.0
_local = LocMemCache("gateway-local-fallback", {"MAX_ENTRIES": 100_000})
_lock = threading.Lock()
_down_until = 0.0
_down_since: float | None = None


def _shared_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        import redis

        errors.append(redis.exceptions.RedisError)
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    return tuple(errors)


_ERRORS = _shared_errors()


def status() -> str | None:
    """None when shared state works; otherwise why features are degraded."""
    if _down_since is None:
        return None
    return f"shared cache unreachable since {time.strftime('%H:%M:%S', time.gmtime(_down_since))} UTC; per-process fallback"


_shared_cache = None


def _backend():
    """One cache client per process. Django's caches["default"] is per thread
    and per asyncio task, so on the gateway (a task per request) it opened a
    new Redis connection for every request: most of the gateway's CPU."""
    global _shared_cache
    if time.monotonic() < _down_until:
        return _local
    if _shared_cache is None:
        _shared_cache = caches.create_connection("default")
    return _shared_cache


@receiver(setting_changed)
def _cache_settings_changed(*, setting: str, **kwargs) -> None:
    global _shared_cache
    if setting == "CACHES":
        _shared_cache = None


def _failed(exc: BaseException) -> None:
    global _down_until, _down_since
    with _lock:
        _down_until = time.monotonic() + RETRY_AFTER_S
        if _down_since is None:
            _down_since = time.time()
            log.warning("shared_cache.down", error=type(exc).__name__, fallback="per-process memory")


def _ok(backend) -> None:
    global _down_since
    if backend is not _local and _down_since is not None:
        with _lock:
            if _down_since is not None:
                log.warning("shared_cache.back", down_for_s=round(time.time() - _down_since, 1))
                _down_since = None


def _call(op: str, *args, **kwargs):
    backend = _backend()
    try:
        result = getattr(backend, op)(*args, **kwargs)
    except _ERRORS as exc:
        if backend is _local:
            raise
        _failed(exc)
        return getattr(_local, op)(*args, **kwargs)
    _ok(backend)
    return result


def _pipeline(backend):
    """A Redis pipeline for a single-server Redis cache (several commands, one
    round trip), else None. Uses Django's key scheme and value encoding, so
    what it writes reads back through the cache API and the other way round."""
    if not isinstance(backend, RedisCache) or len(backend._cache._servers) != 1:
        return None
    return backend._cache.get_client(write=True).pipeline(transaction=False)


def redis_url() -> str | None:
    """The shared cache's Redis URL, when the shared cache is one Redis server."""
    from django.conf import settings

    cache = settings.CACHES["default"]
    if "redis" not in cache["BACKEND"].lower():
        return None
    location = cache["LOCATION"]
    if isinstance(location, str) and "," not in location:
        return location
    return None


def publish(channel: str, message: str) -> None:
    """Best effort: listeners that miss it catch up from the shared cache."""
    backend = _backend()
    if not isinstance(backend, RedisCache):
        return
    try:
        backend._cache.get_client(write=True).publish(channel, message)
    except _ERRORS as exc:
        _failed(exc)


def incr_then_get(counter: str, delta: int, ttl: int, read: str) -> tuple[int, object]:
    """Add to a counter living `ttl` seconds from its first use, and read
    another key: one round trip on Redis (this runs for every provider call)."""
    backend = _backend()
    pipe = _pipeline(backend)
    if pipe is not None:
        try:
            key = backend.make_and_validate_key(counter)
            pipe.incrby(key, delta)
            pipe.expire(key, int(ttl), nx=True)
            pipe.get(backend.make_and_validate_key(read))
            count, _, raw = pipe.execute()
        except _ERRORS as exc:
            _failed(exc)
        else:
            _ok(backend)
            return int(count), (None if raw is None else backend._cache._serializer.loads(raw))
    return incr(counter, delta, ttl), get(read)


def incr_many(counters: list[tuple[str, int]], ttl: int) -> list[int]:
    """Add to several counters living `ttl` seconds from their first use: one
    round trip on Redis (rate limits run this for every request)."""
    backend = _backend()
    pipe = _pipeline(backend)
    if pipe is not None:
        _queue_incr(pipe, backend, counters, ttl)
        try:
            replies = pipe.execute()
        except _ERRORS as exc:
            _failed(exc)
        else:
            _ok(backend)
            return [int(n) for n in replies[::2]]
    return [incr(key, delta, ttl) for key, delta in counters]


async def incr_many_async(counters: list[tuple[str, int]], ttl: int) -> list[int]:
    """incr_many from the event loop: the request waits for Redis without a
    database thread. The same keys and encoding as the cache API, so both
    paths count into the same counters. Without Redis the counters are in
    this process's memory and need no wait."""
    backend = _backend()
    if isinstance(backend, LocMemCache):
        return incr_many(counters, ttl)
    batcher = _async_batcher(backend)
    if batcher is None:
        return await asyncio.to_thread(incr_many, counters, ttl)
    try:
        counts = await batcher.incr(counters, ttl)
    except _ERRORS as exc:
        _failed(exc)  # from now on _backend() is this process's memory
        return incr_many(counters, ttl)
    _ok(backend)
    return counts


def _queue_incr(pipe, backend, counters: list[tuple[str, int]], ttl: int) -> None:
    for key, delta in counters:
        full = backend.make_and_validate_key(key)
        pipe.incrby(full, delta)
        pipe.expire(full, int(ttl), nx=True)


class _IncrBatcher:
    """The counters of every request that arrives while a pipeline is out go
    in the next pipeline, on one connection: at c=200 a pipeline per request
    queued for a pool's connections and cost more CPU than the counting. A
    lone request is sent at once; nobody waits for a timer."""

    def __init__(self, backend, client):
        self._backend = backend
        self._client = client
        self._pending: list[tuple[list[tuple[str, int]], int, asyncio.Future]] = []
        self._sending = False

    async def incr(self, counters: list[tuple[str, int]], ttl: int) -> list[int]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((counters, ttl, future))
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                pipe = self._client.pipeline(transaction=False)
                for counters, ttl, _ in batch:
                    _queue_incr(pipe, self._backend, counters, ttl)
                try:
                    replies = await pipe.execute()
                except BaseException as exc:  # noqa: BLE001 - every waiter gets the reason; Redis errors fall back
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                at = 0
                for counters, _, future in batch:
                    n = 2 * len(counters)
                    if not future.done():
                        future.set_result([int(c) for c in replies[at:n + at:2]])
                    at += n
        finally:
            # Only reached with requests still queued when this task itself was
            # cancelled (the loop shutting down): nobody is left waiting for it.
            self._sending = False
            left, self._pending = self._pending, []
            for _, _, future in left:
                future.cancel()


# One batcher (one asyncio Redis client) per event loop: a client's
# connections belong to the loop that opened them. Not a WeakKeyDictionary:
# a batcher's client holds its loop, so the entry would never go; the
# batchers of loops that have closed are dropped when a new loop asks.
_batchers: "dict[asyncio.AbstractEventLoop, _IncrBatcher]" = {}


def _async_batcher(backend) -> _IncrBatcher | None:
    if not isinstance(backend, RedisCache) or len(backend._cache._servers) != 1:
        return None
    loop = asyncio.get_running_loop()
    batcher = _batchers.get(loop)
    if batcher is None or batcher._backend is not backend:
        for closed in [other for other in _batchers if other.is_closed()]:
            del _batchers[closed]
        import redis.asyncio as aioredis
        from django.conf import settings

        options = settings.CACHES["default"].get("OPTIONS", {})
        timeout = options.get("socket_timeout", 0.25)
        client = aioredis.Redis.from_url(
            backend._cache._servers[0],
            socket_timeout=timeout,
            socket_connect_timeout=options.get("socket_connect_timeout", timeout),
        )
        batcher = _batchers[loop] = _IncrBatcher(backend, client)
    return batcher


def incr(key: str, delta: int, ttl: int) -> int:
    """Atomic add to a counter that lives `ttl` seconds from its first use."""
    _call("add", key, 0, ttl)
    try:
        return _call("incr", key, delta)
    except ValueError:  # expired between add and incr
        _call("add", key, 0, ttl)
        return _call("incr", key, delta)


def add(key: str, value, ttl: float) -> bool:
    return _call("add", key, value, ttl)


def get(key: str, default=None):
    return _call("get", key, default)


def get_many(keys: list[str]) -> dict:
    return _call("get_many", keys)


def set(key: str, value, ttl: float | None) -> None:  # noqa: A001 - mirrors the cache API
    _call("set", key, value, ttl)


def delete_many(keys: list[str]) -> None:
    _call("delete_many", keys)
